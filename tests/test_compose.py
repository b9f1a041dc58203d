"""compose.yaml: Docker cannot run here, so check it is valid and wired as documented."""

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "compose.yaml"


def test_compose_runs_postgis_with_a_volume_and_healthcheck_and_points_the_app_at_it():
    spec = yaml.safe_load(COMPOSE.read_text())
    db = spec["services"]["db"]
    assert db["image"].startswith("postgis/postgis:")
    assert any(v.split(":")[0] in spec["volumes"] for v in db["volumes"])  # a named volume
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    app = spec["services"]["app"]
    user, password, name = (
        db["environment"][k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB")
    )
    assert app["environment"]["SPATIALDB_URL"] == f"postgresql://{user}:{password}@db:5432/{name}"
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert (COMPOSE.parent / app["build"] / "Dockerfile").exists()
