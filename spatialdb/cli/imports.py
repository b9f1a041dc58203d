"""`spatialdb import RESULTS --slide SLIDE`: bring existing results into the database."""

from __future__ import annotations

from pathlib import Path

import click

from spatialdb.catalog import fingerprint
from spatialdb.cli.ingest import open_reader, refresh_features, slide_record
from spatialdb.db import connect
from spatialdb.errors import UserError
from spatialdb.imports import fit_note, fit_to_slide, read_dat, read_geojson
from spatialdb.schema import OBJECT_TABLES


@click.command("import")
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--slide",
    "slide_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The slide file the results belong to (gives size and µm per pixel).",
)
@click.option("--mpp", type=float, help="µm per pixel, for slides whose file does not record it.")
@click.option(
    "--table",
    type=click.Choice(OBJECT_TABLES),
    help="Store every GeoJSON feature in this table (default: decided per feature).",
)
@click.pass_obj
def import_results(obj: dict, results: Path, slide_path: Path, mpp, table) -> None:
    """Store RESULTS (a Cerberus .dat or a GeoJSON file) as a new run of SLIDE, replacing its
    current objects atomically."""
    from inference.network import GLAND_TYPES, NUCLEUS_TYPES, TISSUE_CLASSES
    from spatialdb.loader import RunWriter

    if not results.is_file():
        raise UserError(f"{results}: no such file")
    reader = open_reader(slide_path, mpp)
    meta = reader.info
    width, height = (int(v) for v in meta.slide_dimensions)
    if results.suffix.lower() == ".dat":
        kind = "cerberus-dat"
        types = {"Nuclei": list(NUCLEUS_TYPES), "Gland": list(GLAND_TYPES)}
        parsed = read_dat(results, float(meta.mpp[0]), types)
    elif results.suffix.lower() in (".geojson", ".json"):
        kind = "geojson"
        parsed = read_geojson(results, table, set(TISSUE_CLASSES))
    else:
        raise UserError(f"{results}: expected a Cerberus .dat or a .geojson/.json file")
    fitted = fit_to_slide(results, parsed, width, height)

    slide = slide_record(slide_path, reader, fingerprint(slide_path))
    parameters = {"source": str(results.resolve()), "format": kind}
    engine = connect(obj["db_url"])
    with RunWriter(engine, slide, kind="import", parameters=parameters) as run:
        for name, objects in parsed.items():
            if objects.geoms:
                run.add(name, objects.geoms, objects.classes, objects.probability)
        result = run.commit()
    refresh_features(engine, result.slide_id, results)
    stored = ", ".join(f"{t} {result.total(t):,}" for t in OBJECT_TABLES if result.total(t))
    click.echo(
        f"{results.name}: imported into slide {result.slide_id} ({slide.name}), run "
        f"{result.run_id}: {stored or 'no objects'}{fit_note(fitted)}"
    )
