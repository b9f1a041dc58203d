"""Cohort page: every slide with its status, model, object counts and key features."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.data import Reader

COLUMNS = {
    "id": "id", "name": "slide", "status": "status", "run_kind": "run", "model": "model",
    "nuclei": "nuclei", "glands": "glands", "lumina": "lumina", "features": "features",
    "gland_area_fraction": "gland area / tissue",
    "nuclei_per_1000um2_in_glands": "nuclei per 1000 µm² in glands",
    "nuclei_per_1000um2_in_stroma": "nuclei per 1000 µm² in stroma",
    "median_gland_area_um2": "median gland area µm²", "prediction": "latest slide-level prediction",
}  # fmt: skip


def open_slide(slide_id: int) -> None:
    """Switch to the slide page on `slide_id` (runs before the next rerun draws the widgets)."""
    st.session_state["slide_id"] = int(slide_id)
    st.session_state["page"] = "Slide"


def _on_select(table: pd.DataFrame) -> None:
    rows = st.session_state["cohort_table"].selection.rows
    if rows:
        open_slide(table.iloc[rows[0]]["id"])


def render(db: Reader, cohort: pd.DataFrame) -> None:
    st.title("Cohort")
    left, middle, right = st.columns([2, 2, 1])
    name = left.text_input("Slide name contains", key="cohort_name")
    statuses = middle.multiselect("Status", sorted(cohort["status"].unique()), key="cohort_status")
    with_features = right.checkbox("With features only", key="cohort_features")
    table = cohort.copy()
    table["median_gland_area_um2"] = pd.to_numeric(table["median_gland_area_um2"])
    if name:
        table = table[table["name"].str.contains(name, case=False, regex=False)]
    if statuses:
        table = table[table["status"].isin(statuses)]
    if with_features:
        table = table[table["features"]]
    sort = st.selectbox("Sort by", list(COLUMNS.values()), key="cohort_sort")
    table = table[list(COLUMNS)].rename(columns=COLUMNS).sort_values(sort, na_position="last")
    table = table.reset_index(drop=True)
    st.caption(
        f"{len(table)} of {len(cohort)} slides, {int(table['nuclei'].sum()):,} nuclei, "
        f"{int(table['glands'].sum()):,} glands. Select a row to open the slide."
    )
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        on_select=lambda: _on_select(table),
        selection_mode="single-row",
        key="cohort_table",
    )
