"""Property-based tests: GeoJSON import parsing and the geometry repair, on arbitrary input."""

from __future__ import annotations

import numpy as np
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

from spatialdb.errors import UserError
from spatialdb.interop.qupath_geojson import parse_features
from spatialdb.interop.results import fit_to_slide, geojson_objects
from spatialdb.store.geometry import prepare_polygons

WIDTH, HEIGHT = 1000, 800
TISSUE = {"stroma", "tumour"}

numbers = st.one_of(
    st.floats(-200, 1200),
    st.integers(-200, 1200),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, 10**400]),
)
positions = st.one_of(
    st.lists(numbers, min_size=2, max_size=2),
    st.lists(numbers, max_size=4),
    st.text(max_size=3),
)
rings = st.lists(positions, max_size=8).map(lambda r: r + r[:1] if r else r)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
geometries = st.one_of(
    st.fixed_dictionaries({"type": st.just("Polygon"), "coordinates": st.lists(rings, max_size=3)}),
    st.fixed_dictionaries(
        {
            "type": st.just("MultiPolygon"),
            "coordinates": st.lists(st.lists(rings, max_size=2), max_size=3),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["Point", "LineString", "Circle", "GeometryCollection", 7]),
            "coordinates": json_values,
        }
    ),
    json_values,
)
classes = st.one_of(
    st.sampled_from(["gland", "lumen", "stroma", "x'; DROP TABLE slide; --"]), json_values
)
properties = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "objectType": st.sampled_from(["detection", "cell", "annotation", "tma-core"]),
            "classification": st.one_of(st.fixed_dictionaries({"name": classes}), classes),
            "measurements": json_values,
            "probability": numbers,
            "nucleusGeometry": geometries,
            "spatialdb_table": st.sampled_from(["gland", "nucleus", "slide"]),
        },
    ),
    json_values,
)
features = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("Feature"), "geometry": geometries, "properties": properties}
    ),
    json_values,
)


def assert_storable(parsed) -> None:
    frame = shapely.box(0, 0, WIDTH, HEIGHT)
    for objects in parsed.values():
        geoms = np.array(objects.geoms, dtype=object)
        assert shapely.is_valid(geoms).all() and not shapely.is_empty(geoms).any()
        assert (shapely.area(geoms) > 0).all() and shapely.covered_by(geoms, frame).all()
        assert all(isinstance(c, str) and c for c in objects.classes)
        assert len(objects.classes) == len(objects.probability) == len(geoms)


@settings(max_examples=300, deadline=None)
@given(st.lists(features, max_size=4))
def test_import_parsing_gives_storable_polygons_or_a_user_error(items):
    for parse in (
        lambda: geojson_objects("f.geojson", items, None, TISSUE),
        lambda: parse_features("f.geojson", items, TISSUE)[0],
    ):
        try:
            parsed = parse()
            fit_to_slide("f.geojson", parsed, WIDTH, HEIGHT)
        except UserError:
            continue
        assert_storable(parsed)


coordinates = st.floats(-1000, 1000, allow_nan=False, width=32)
polygons = st.lists(st.tuples(coordinates, coordinates), min_size=3, max_size=10).map(
    shapely.Polygon
)


@settings(max_examples=300, deadline=None)
@given(st.lists(polygons | st.lists(polygons, max_size=3).map(shapely.MultiPolygon), max_size=5))
def test_repair_output_is_valid_and_valid_input_keeps_its_area(geoms):
    for multi in (False, True):
        prepared = prepare_polygons(geoms, multi=multi)
        assert shapely.is_valid(prepared.geoms).all()
        assert (shapely.area(prepared.geoms) > 0).all()
        for geom, source in zip(prepared.geoms, prepared.source_index, strict=True):
            original = geoms[source]
            if original.is_valid and (multi or original.geom_type == "Polygon"):
                assert np.isclose(geom.area, original.area, rtol=1e-9, atol=0)
