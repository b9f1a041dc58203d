"""Nuclei out to scverse: `features export --level nucleus --format anndata` writes an .h5ad that
anndata reads back (identity, classes, features, centroids in µm, the slide) with what squidpy's
neighbourhood functions read: `obsm["spatial"]` and a categorical cluster key. Where squidpy is
installed, its `spatial_neighbors` and `nhood_enrichment` run on it. (squidpy 1.8 is not a dev
dependency: on Python 3.11 it holds imagecodecs below 2026, which would change the TIFF stack the
product is tested with.)"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest

from spatialdb.features import export as feature_export
from spatialdb.store.morphometry import MORPHOMETRY
from tests.features.test_features import MPP, load_known_slide
from tests.test_cli import assert_one_error_line, spatialdb


def test_anndata_export_holds_the_nuclei_and_squidpy_runs_on_it(engine, tmp_path):
    slide_id = load_known_slide(engine, name="scverse", nuclei_in_bar=30)
    csv = feature_export.export(engine, "nucleus", "csv", tmp_path / "n.csv", [slide_id])
    table = pd.read_csv(csv.path)
    out = feature_export.export(engine, "nucleus", "anndata", tmp_path / "n.h5ad", [slide_id])
    assert out.rows == len(table) and not list(tmp_path.glob(".*partial"))

    data = anndata.read_h5ad(out.path)
    assert data.n_obs == len(table)
    assert list(data.obs_names) == table["nucleus_uuid"].tolist()
    assert data.obs["nucleus_class"].dtype == "category"
    assert set(data.obs["nucleus_class"].cat.categories) == set(table["nucleus_class"])
    assert {"nucleus_id", "gland_id", "tissue_class", "slide_id"} <= set(data.obs.columns)
    assert set(MORPHOMETRY) | {"area_um2", "neighbours_within_25_um"} <= set(data.var_names)
    for name in ("area_um2", "eccentricity", "nearest_1_distance_um"):
        np.testing.assert_allclose(
            data[:, name].X.ravel(), table[name].to_numpy(float), rtol=1e-6, equal_nan=True
        )
    centroids = table[["centroid_x_px", "centroid_y_px"]].to_numpy(float) * MPP
    np.testing.assert_allclose(data.obsm["spatial"], centroids)
    (slide,) = data.uns["spatialdb"]["slides"].values()
    assert slide["id"] == slide_id and slide["name"] == "scverse"
    assert slide["mpp_x"] == pytest.approx(MPP) and slide["run_id"] == table["run_id"][0]

    assert data.obsm["spatial"].dtype == np.float64 and data.obsm["spatial"].shape == (
        len(table),
        2,
    )
    try:
        import squidpy as sq
    except ImportError:
        return
    sq.gr.spatial_neighbors(data, coord_type="generic", radius=25.0)
    assert data.obsp["spatial_connectivities"].shape == (data.n_obs, data.n_obs)
    sq.gr.nhood_enrichment(
        data, cluster_key="nucleus_class", n_perms=20, seed=0, show_progress_bar=False
    )
    classes = len(data.obs["nucleus_class"].cat.categories)
    assert data.uns["nucleus_class_nhood_enrichment"]["zscore"].shape == (classes, classes)


def test_anndata_is_for_nuclei(engine, cli_env, tmp_path):
    load_known_slide(engine, name="glands-only")
    result = spatialdb(
        "features", "export", "--level", "gland", "--format", "anndata", "-o",
        str(tmp_path / "g.h5ad"), env=cli_env,
    )  # fmt: skip
    assert_one_error_line(result, "--format anndata holds nuclei")
    assert not list(tmp_path.iterdir())
