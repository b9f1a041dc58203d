"""Slide page: the slide viewer (deep zoom, every object drawn, from the tile server of
`dashboard.viewer_server`), and on demand a still picture of the slide or a region."""

from __future__ import annotations

import html
import io
import os
from urllib.parse import urlsplit

import pandas as pd
import streamlit as st

from dashboard.data import Box, Reader
from dashboard.overlay import LAYERS
from dashboard.overlay import render as render_view
from dashboard.viewer_server import ViewerServer, openlayers_installed
from spatialdb.config import ENV_VIEWER_PORT

VIEWER_HEIGHT_PX = 720

FIELDS_UM = (100, 250, 500, 1000, 2000, 5000)


def slide_choice(cohort: pd.DataFrame) -> dict:
    """The slide chosen in the sidebar (the one opened from the cohort page by default)."""
    ids = cohort["id"].tolist()
    current = st.session_state.get("slide_id")
    index = ids.index(current) if current in ids else 0
    labels = {row.id: f"{row.id}: {row.name}" for row in cohort.itertuples()}
    chosen = st.sidebar.selectbox("Slide", ids, index=index, format_func=labels.get)
    st.session_state["slide_id"] = chosen
    return cohort[cohort["id"] == chosen].iloc[0].to_dict()


def region(slide: dict) -> Box:
    """The whole slide, or a field of view around a chosen centre."""
    width, height, mpp = slide["width"], slide["height"], slide["mpp_x"]
    whole = st.toggle("Zoom into a region", key="zoom") is False
    if whole:
        return Box(0, 0, width, height)
    a, b, c = st.columns(3)
    cx = a.slider("Centre x (% of width)", 0.0, 100.0, 50.0, key="zoom_x")
    cy = b.slider("Centre y (% of height)", 0.0, 100.0, 50.0, key="zoom_y")
    field_um = c.select_slider("Field of view (µm)", FIELDS_UM, value=500, key="zoom_um")
    half = field_um / mpp / 2
    x, y = cx / 100 * width, cy / 100 * height
    return Box(max(0, x - half), max(0, y - half), min(width, x + half), min(height, y + half))


def legend(classes: dict[str, tuple[int, int, int]]) -> None:
    items = " ".join(
        f'<span style="white-space:nowrap;margin-right:1em"><span style="display:inline-block;'
        f"width:0.9em;height:0.9em;background:rgb{colour};border:1px solid #444;"
        f'margin-right:0.3em"></span>{html.escape(name)}</span>'
        for name, colour in sorted(classes.items())
    )
    st.markdown(items or "_nothing drawn_", unsafe_allow_html=True)


@st.cache_resource(show_spinner=False)
def viewer_server(url: str, _db: Reader) -> ViewerServer:
    """This dashboard's tile server (one per database, shared by every session): on the
    dashboard's address, at SPATIALDB_VIEWER_PORT or the dashboard's port + 1 where that is free,
    else on any free port."""
    address = st.get_option("server.address") or "127.0.0.1"
    port = int(os.environ.get(ENV_VIEWER_PORT) or st.get_option("server.port") + 1)
    try:
        return ViewerServer(_db, address, port)
    except OSError:
        return ViewerServer(_db, address, 0)


def viewer_url(server: ViewerServer, slide_id: int) -> str:
    """The viewer page of a slide; where the viewer listens on every interface, on the host name
    the browser reached the dashboard by."""
    host = server.address
    if host == "0.0.0.0":
        host = urlsplit("//" + (st.context.headers.get("Host") or "")).hostname or "127.0.0.1"
    return f"http://{host}:{server.port}/viewer?slide={slide_id}"


def render(db: Reader, cohort: pd.DataFrame) -> None:
    slide = slide_choice(cohort)
    st.title(f"Slide {slide['id']}: {slide['name']}")
    st.caption(
        f"{slide['width']:,} × {slide['height']:,} px at {slide['mpp_x']:.3f} µm/px · "
        f"run {slide['run_id']} ({slide['run_kind'] or 'none'}) · {int(slide['nuclei']):,} nuclei, "
        f"{int(slide['glands']):,} glands, {int(slide['lumina']):,} lumina"
    )
    if not slide["features"]:
        st.warning(
            f"This slide has no features for its current run yet: run "
            f"`spatialdb features refresh {slide['id']}`."
        )
    if openlayers_installed():
        server = viewer_server(db.engine.url.render_as_string(hide_password=False), db)
        st.iframe(viewer_url(server, int(slide["id"])), height=VIEWER_HEIGHT_PX)
    else:
        st.error("The slide viewer needs OpenLayers: run `bash scripts/setup.sh` once.")
    if st.toggle("Still picture of the slide or a region (PNG)", key="picture"):
        picture(db, slide)


def picture(db: Reader, slide: dict) -> None:
    """The slide or a region drawn into one picture, with a download of it."""
    layers = st.multiselect(
        "Layers", list(LAYERS), default=list(LAYERS), format_func=LAYERS.get, key="layers"
    )
    box = region(slide)
    view = render_view(db, slide, box, layers)
    st.image(view.image, caption=_describe(view, box, slide), width="stretch")
    if view.image_note:
        st.caption(view.image_note)
    legend(view.classes)
    png = io.BytesIO()
    view.image.save(png, "PNG")
    st.download_button(
        "Download the picture (PNG)", png.getvalue(), f"{slide['name']}.png", "image/png"
    )


def _describe(view, box: Box, slide: dict) -> str:
    parts = [f"{LAYERS[t]}: {n:,} drawn" for t, n in view.drawn.items()]
    parts += [
        f"{LAYERS[t]}: {n:,} as density (zoom in for outlines)" for t, n in view.aggregated.items()
    ]
    field_mm = box.width * slide["mpp_x"] / 1000
    return f"field {field_mm:.2f} mm wide · " + " · ".join(parts)
