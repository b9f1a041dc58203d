"""The dashboard: pages, filters, friendly messages and read-only access, through Streamlit's
AppTest against the real PostGIS, and end to end in Debian's Chromium driven by Playwright."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import shapely
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from streamlit.testing.v1 import AppTest

from dashboard.data import Reader
from spatialdb.config import ENV_DASHBOARD_URL as ENV_URL
from spatialdb.store.loader import RunWriter
from tests.conftest import make_slide
from tests.dashboard.conftest import APP, CHROMIUM, launch, viewer_frame
from tests.features.test_features import load_known_slide


@pytest.fixture
def app(db_url, monkeypatch):
    """A fresh AppTest of the dashboard on the test database."""
    monkeypatch.setenv(ENV_URL, db_url)

    def run(page: str | None = None) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.run()
        if page:
            at.sidebar.radio[0].set_value(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return run


@pytest.fixture
def slides(engine):
    """Two slides with features and one whose new run has none yet."""
    known = load_known_slide(engine, name="known")
    other = load_known_slide(engine, name="other", nuclei_in_bar=3)
    with RunWriter(engine, make_slide("pending", width=1000, height=1000, mpp=0.5)) as run:
        run.add("gland", [shapely.box(10, 10, 200, 200)], "gland")
        pending = run.commit().slide_id
    return {"known": known, "other": other, "pending": pending}


def elements(at: AppTest, kind: str) -> list:
    return [e for e in at.get(kind)]


def test_an_empty_database_gets_a_friendly_page(engine, app):
    at = app()
    assert any("No slides yet" in i.value for i in at.info)
    assert not at.error


def test_an_unreachable_database_gets_a_friendly_page(monkeypatch):
    monkeypatch.setenv(ENV_URL, "postgresql://nobody@127.0.0.1:9/none?connect_timeout=2")
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert any("cannot be reached" in e.value for e in at.error)


def test_cohort_lists_slides_and_filters_them(app, slides):
    at = app()
    assert at.title[0].value == "Cohort"
    table = at.dataframe[0].value
    assert sorted(table["slide"]) == ["known", "other", "pending"]
    assert table.set_index("slide").loc["known", "glands"] == 3
    assert not table.set_index("slide").loc["pending", "features"]
    at.text_input(key="cohort_name").input("oth").run()
    assert list(at.dataframe[0].value["slide"]) == ["other"]
    at.text_input(key="cohort_name").input("'; DROP TABLE slide; --").run()
    assert at.dataframe[0].value.empty and not at.exception
    at.text_input(key="cohort_name").input("").run()
    at.checkbox(key="cohort_features").check().run()
    assert sorted(at.dataframe[0].value["slide"]) == ["known", "other"]


def test_slide_page_draws_overlays_whole_and_zoomed(app, slides):
    at = app("Slide")
    at.sidebar.selectbox[0].set_value(slides["known"]).run()
    assert at.title[0].value == f"Slide {slides['known']}: known"
    assert not at.get("image")  # the still picture is drawn on demand only
    at.toggle(key="picture").set_value(True).run()
    (image,) = elements(at, "image")
    assert image.proto.imgs[0].url
    caption = image.proto.imgs[0].caption
    assert "Nuclei: 9 drawn" in caption and "Glands: 3 drawn" in caption
    legend = "".join(m.value for m in at.markdown)
    assert "epithelial" in legend and "normal epithelium" in legend
    at.toggle(key="zoom").set_value(True).run()
    at.slider(key="zoom_x").set_value(5.0).run()
    at.slider(key="zoom_y").set_value(5.0).run()
    at.select_slider(key="zoom_um").set_value(100).run()
    caption = elements(at, "image")[0].proto.imgs[0].caption
    assert "field 0.10 mm wide" in caption
    assert "Glands: 1 drawn" in caption  # only the square lies near the top-left corner


def test_a_slide_without_features_says_so(app, slides):
    at = app("Slide")
    at.sidebar.selectbox[0].set_value(slides["pending"]).run()
    assert any("no features for its current run" in w.value for w in at.warning)


def test_features_page_plots_and_offers_downloads(app, slides):
    at = app("Features")
    charts = elements(at, "vega_lite_chart")
    assert len(charts) >= 6  # histogram, box, scatter, densities, per compartment, per nucleus
    assert any("Nuclear density per compartment" in c.proto.spec for c in charts)
    assert "Spatial statistics" in [h.value for h in at.subheader]
    tables = [t.value for t in at.dataframe]
    assert any("inside_glands_per_mm_boundary" in t.columns for t in tables)
    per_nucleus = charts[-1].proto.spec
    assert "delaunay_degree" not in per_nucleus and "area_um2 per nucleus" in per_nucleus
    at.selectbox(key="nucleus_feature").set_value("neighbours_within_25_um").run()
    assert not at.exception
    spec = elements(at, "vega_lite_chart")[-1].proto.spec
    assert "neighbours_within_25_um per nucleus, by class" in spec
    labels = [b.proto.label for b in elements(at, "download_button")]
    assert labels == [
        "gland features (csv)", "gland features (parquet)",
        "slide features (csv)", "slide features (parquet)",
    ]  # fmt: skip


def test_export_page_writes_the_qupath_export(app, slides, tmp_path):
    at = app("Export")
    at.multiselect[0].set_value([slides["known"]]).run()
    at.text_input(key="export_dir").input(str(tmp_path / "qp")).run()
    at.button[0].click().run()
    assert any("known.geojson.gz" in s.value for s in at.success)
    assert (tmp_path / "qp" / "known.geojson.gz").exists()


def test_the_dashboard_cannot_write(db_url, slides):
    reader = Reader(db_url)
    with reader.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM slide")).scalar() == 3
        with pytest.raises(DBAPIError, match=r"permission denied|read-only"):
            conn.execute(text("DELETE FROM slide"))
    with reader.engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar() == "spatialdb_reader"
    reader.engine.dispose()


# -- in a real browser -------------------------------------------------------------------------


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_every_page_renders_in_chromium(dashboard_url, slides, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(dashboard_url)
        expect(page.get_by_role("heading", name="Cohort")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("3 of 3 slides")).to_be_visible()
        page.screenshot(path=tmp_path / "cohort.png", full_page=True)
        page.get_by_label("Slide name contains").fill("known")
        page.get_by_label("Slide name contains").press("Enter")
        expect(page.get_by_text("1 of 3 slides")).to_be_visible(timeout=30_000)

        page.get_by_text("Slide", exact=True).first.click()
        expect(page.get_by_role("heading", name="Slide")).to_be_visible(timeout=60_000)
        viewer = viewer_frame(page)
        viewer.wait_for_function("window.viewer && window.viewer.renders > 0", timeout=60_000)
        assert viewer.locator("#title").inner_text().startswith("known: 3,000")
        page.get_by_text("Still picture of the slide or a region").click()
        picture = page.locator("[data-testid='stImage'] img").first
        expect(picture).to_be_visible(timeout=60_000)
        assert picture.evaluate("img => img.naturalWidth") > 100
        page.screenshot(path=tmp_path / "slide.png", full_page=True)

        page.get_by_text("Features", exact=True).first.click()
        expect(page.get_by_role("heading", name="Features")).to_be_visible(timeout=60_000)
        charts = page.locator(
            "[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg"
        )
        expect(charts.first).to_be_visible(timeout=60_000)
        deadline = time.monotonic() + 60
        while charts.count() < 4 and time.monotonic() < deadline:  # charts render lazily
            page.mouse.wheel(0, 2000)
            page.wait_for_timeout(500)
        assert charts.count() >= 4  # histogram, box plot, scatter, nuclear densities
        page.screenshot(path=tmp_path / "features.png", full_page=True)
        browser.close()
    assert all(
        (tmp_path / f"{name}.png").stat().st_size > 10_000
        for name in ("cohort", "slide", "features")
    )
