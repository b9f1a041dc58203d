"""Export page: write the QuPath export of chosen slides into a folder and say where."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard.data import Reader
from spatialdb.errors import UserError
from spatialdb.interop.qupath_export import export_slides
from spatialdb.interop.qupath_geojson import OBJECT_CHOICES


def render(db: Reader, cohort: pd.DataFrame) -> None:
    st.title("Export to QuPath")
    labels = {row.id: f"{row.id}: {row.name}" for row in cohort.itertuples()}
    default = [i for i in [st.session_state.get("slide_id")] if i in labels]
    chosen = st.multiselect("Slides", list(labels), default=default, format_func=labels.get)
    objects = st.multiselect("Objects", list(OBJECT_CHOICES), default=list(OBJECT_CHOICES))
    folder = st.text_input("Folder", value=str(Path.cwd() / "qupath-export"), key="export_dir")
    if not st.button("Write QuPath export", disabled=not chosen or not objects, type="primary"):
        return
    try:
        with st.spinner("Writing..."):
            result = export_slides(
                db.engine, Path(folder).expanduser(), chosen, [OBJECT_CHOICES[o] for o in objects]
            )
    except (UserError, OSError) as exc:
        st.error(f"Export failed: {exc}")
        return
    lines = [
        f"- slide {s['id']} ({s['name']}): {n:,} objects → `{path}`" for s, path, n in result.files
    ]
    lines.append(f"- QuPath script → `{result.script}`")
    if result.project:
        lines.append(f"- QuPath project → `{result.project}`")
    st.success("Written:\n" + "\n".join(lines))
    if result.no_project:
        st.caption(f"No QuPath project: {result.no_project}")
