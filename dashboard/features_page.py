"""Features page: per-gland distributions and scatter plots, per-class nuclear densities,
per-nucleus features by class, slides compared, and the feature tables to download."""

from __future__ import annotations

import tempfile
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.data import Reader
from spatialdb.features.export import export

GLAND_FEATURES = (
    "area_um2", "perimeter_um", "circularity", "solidity", "major_axis_um", "minor_axis_um",
    "elongation", "nuclei_count", "nuclei_per_1000um2", "nuclear_area_mean_um2",
    "nuclear_area_median_um2", "lumen_count", "lumen_area_um2", "lumen_to_gland_area_ratio",
    "nearest_gland_distance_um",
)  # fmt: skip
NUCLEUS_FEATURES = (
    "area_um2", "perimeter_um", "equivalent_diameter_um", "major_axis_um", "minor_axis_um",
    "eccentricity", "orientation_deg", "circularity", "solidity", "extent",
    "haematoxylin_od_mean", "eosin_od_mean", "cytoplasm_haematoxylin_od_mean",
    "cytoplasm_eosin_od_mean",
    "distance_to_gland_boundary_um", "neighbours_within_25_um",
    "neighbours_within_50_um", "nearest_1_distance_um", "nearest_5_distance_um",
    "delaunay_degree", "delaunay_edge_mean_um",
)  # fmt: skip


def render(db: Reader, cohort: pd.DataFrame) -> None:
    st.title("Features")
    ready = cohort[cohort["features"]]
    if ready.empty:
        st.info("No slide has features yet: run `spatialdb features refresh`.")
        return
    labels = {row.id: f"{row.id}: {row.name}" for row in ready.itertuples()}
    default = [i for i in [st.session_state.get("slide_id")] if i in labels] or list(labels)[:1]
    chosen = st.multiselect("Slides", list(labels), default=default, format_func=labels.get)
    if not chosen:
        st.info("Choose one or more slides.")
        return
    glands = db.gland_features(chosen)
    slides = db.slide_features(chosen)
    if glands.empty:
        st.info("The chosen slides have no glands.")
    else:
        distributions(glands)
    nuclear_densities(slides)
    spatial_statistics(db.spatial_features(chosen))
    nucleus_distributions(db, chosen, labels)
    downloads(db, chosen)


def distributions(glands: pd.DataFrame) -> None:
    left, right = st.columns(2)
    feature = left.selectbox("Per-gland feature", GLAND_FEATURES, key="feature")
    histogram = (
        alt.Chart(glands.dropna(subset=[feature]))
        .mark_bar(opacity=0.7)
        .encode(
            alt.X(f"{feature}:Q", bin=alt.Bin(maxbins=40)),
            alt.Y("count():Q", stack=None),
            alt.Color("slide:N"),
        )
        .properties(title=f"{feature} per gland", height=300)
    )
    left.altair_chart(histogram, width="stretch")
    box = (
        alt.Chart(glands.dropna(subset=[feature]))
        .mark_boxplot()
        .encode(alt.X("slide:N"), alt.Y(f"{feature}:Q"), alt.Color("slide:N", legend=None))
        .properties(title="slides compared", height=300)
    )
    right.altair_chart(box, width="stretch")
    a, b = st.columns(2)
    x = a.selectbox("Scatter x", GLAND_FEATURES, index=0, key="scatter_x")
    y = b.selectbox("Scatter y", GLAND_FEATURES, index=7, key="scatter_y")
    points = glands.dropna(subset=[x, y])
    if len(points) > 20_000:
        points = points.sample(20_000, random_state=0)
    scatter = (
        alt.Chart(points)
        .mark_circle(size=14, opacity=0.5)
        .encode(
            alt.X(f"{x}:Q"), alt.Y(f"{y}:Q"), alt.Color("slide:N"), tooltip=["slide", "gland_id"]
        )
        .properties(title=f"{y} against {x}", height=350)
    )
    st.altair_chart(scatter, width="stretch")


def spatial_statistics(stats: pd.DataFrame) -> None:
    """Each slide's spatial statistics: nuclear densities in glands, stroma and at the border,
    immune infiltration of the glands, and cross-K at 25 µm."""
    st.subheader("Spatial statistics")
    if stats.empty:
        st.caption("No spatial statistics yet: run `spatialdb features refresh`.")
        return
    density = [
        {"slide": row.slide, "compartment": place, "class": cls, "per_mm2": value}
        for row in stats.itertuples()
        for place, classes in row.statistics["density_per_mm2"].items()
        for cls, value in classes.items()
        if value is not None
    ]
    if density:
        chart = (
            alt.Chart(pd.DataFrame(density))
            .mark_bar()
            .encode(alt.X("class:N"), alt.Y("per_mm2:Q", title="nuclei per mm²"),
                    alt.Color("slide:N"), alt.XOffset("slide:N"), alt.Column("compartment:N"))
            .properties(title="Nuclear density per compartment", height=250)
        )  # fmt: skip
        st.altair_chart(chart)
    immune = pd.DataFrame(
        [{"slide": row.slide, **row.statistics["immune"]} for row in stats.itertuples()]
    ).drop(columns=["classes", "within_um"])
    st.caption("Immune nuclei inside glands and within 20 µm of them")
    st.dataframe(immune, hide_index=True)
    cross = pd.DataFrame(
        [
            {"slide": row.slide, "pair (A|B)": pair, "K / πr² at 25 µm": radii.get("25_um")}
            for row in stats.itertuples()
            for pair, radii in row.statistics["cross_k"].items()
        ]
    )
    st.caption("Cross-K of class B around class A (1: independent; above 1: B gathers around A)")
    st.dataframe(cross, hide_index=True)


def nucleus_distributions(db: Reader, chosen: list[int], labels: dict) -> None:
    """One slide's per-nucleus feature (the nucleus export's columns) by nuclear class."""
    left, right = st.columns(2)
    slide_id = left.selectbox("Slide, per nucleus", chosen, format_func=labels.get)
    feature = right.selectbox("Per-nucleus feature", NUCLEUS_FEATURES, key="nucleus_feature")
    run_id = int(db.cohort().set_index("id").loc[slide_id, "run_id"])
    nuclei = nucleus_table(db, (slide_id, run_id)).dropna(subset=[feature])
    if nuclei.empty:
        st.caption("This slide has no nuclei.")
        return
    if len(nuclei) > 50_000:
        nuclei = nuclei.sample(50_000, random_state=0)
    chart = (
        alt.Chart(nuclei[["nucleus_class", feature]])
        .mark_boxplot()
        .encode(alt.X("nucleus_class:N", title="class"), alt.Y(f"{feature}:Q"),
                alt.Color("nucleus_class:N", legend=None))
        .properties(title=f"{feature} per nucleus, by class", height=300)
    )  # fmt: skip
    st.altair_chart(chart, width="stretch")


@st.cache_data(show_spinner="Computing per-nucleus features…", max_entries=4)
def nucleus_table(_db: Reader, key: tuple) -> pd.DataFrame:
    """The slide's nucleus export (`spatialdb features export --level nucleus`) as a frame."""
    slide_id, _run = key
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nuclei.parquet"
        export(_db.engine, "nucleus", "parquet", out, [slide_id])
        return pd.read_parquet(out)


def nuclear_densities(slides: pd.DataFrame) -> None:
    """Nuclei per 1000 µm² of tissue, per nuclear class and slide."""
    rows = []
    for slide in slides.itertuples():
        for cls, n in (slide.object_counts.get("nucleus") or {}).items():
            if slide.tissue_area_um2 > 0:
                rows.append(
                    {
                        "slide": slide.slide,
                        "class": cls,
                        "per_1000um2": 1000 * n / slide.tissue_area_um2,
                    }
                )
    if not rows:
        st.caption("No tissue regions: nuclear densities per class need them.")
        return
    chart = (
        alt.Chart(pd.DataFrame(rows))
        .mark_bar()
        .encode(alt.X("class:N"), alt.Y("per_1000um2:Q", title="nuclei per 1000 µm² of tissue"),
                alt.Color("slide:N"), alt.XOffset("slide:N"))
        .properties(title="nuclear density per class", height=300)
    )  # fmt: skip
    st.altair_chart(chart, width="stretch")


@st.cache_data(show_spinner=False, max_entries=16)
def table_bytes(_db: Reader, key: tuple, level: str, fmt: str) -> bytes:
    """A feature table as the CLI exports it (`spatialdb features export`), as bytes."""
    slide_ids, _runs = key
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{level}.{fmt}"
        export(_db.engine, level, fmt, out, list(slide_ids))
        return out.read_bytes()


def downloads(db: Reader, chosen: list[int]) -> None:
    st.subheader("Download")
    key = (tuple(chosen), tuple(db.cohort().set_index("id").loc[chosen, "run_id"]))
    columns = st.columns(4)
    for column, (level, fmt) in zip(
        columns,
        [("gland", "csv"), ("gland", "parquet"), ("slide", "csv"), ("slide", "parquet")],
        strict=True,
    ):
        column.download_button(
            f"{level} features ({fmt})",
            data=table_bytes(db, key, level, fmt),
            file_name=f"{level}_features.{fmt}",
            key=f"download_{level}_{fmt}",
        )
