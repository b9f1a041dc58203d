"""The spatialdb dashboard (Streamlit): cohort, slide viewer, feature plots and QuPath export.

Start it with `spatialdb dashboard`. It only reads the database (see `dashboard.data`).
"""

from __future__ import annotations

import os

import streamlit as st

from dashboard import cohort_page, export_page, features_page, slide_page
from dashboard.data import Reader, Unavailable
from spatialdb.config import ENV_DASHBOARD_URL

PAGES = {
    "Cohort": cohort_page.render,
    "Slide": slide_page.render,
    "Features": features_page.render,
    "Export": export_page.render,
}


@st.cache_resource(show_spinner=False)
def reader(url: str | None) -> Reader:
    """One reader per database URL, shared by every session of this server."""
    return Reader.from_url(url)


def main() -> None:
    st.set_page_config(page_title="spatialdb", layout="wide")
    page = st.sidebar.radio("Page", list(PAGES), key="page")
    try:
        db = reader(os.environ.get(ENV_DASHBOARD_URL) or os.environ.get("SPATIALDB_URL"))
        cohort = db.cohort()
    except Unavailable as exc:
        reader.clear()  # connect again on the next interaction
        st.error(
            f"The database cannot be reached ({exc}). Check that it is running; this page "
            "tries again when you interact with it."
        )
        return
    st.sidebar.caption(f"read-only access: {db.mode}")
    if cohort.empty:
        st.info(
            "No slides yet. Ingest one with `spatialdb ingest SLIDE` or import results with "
            "`spatialdb import` / `spatialdb import-qupath`."
        )
        return
    try:
        PAGES[page](db, cohort)
    except Unavailable as exc:
        st.error(f"Lost the database connection ({exc}). Interact with the page to try again.")


main()
