"""`spatialdb slide-model train|predict`: slide-level targets learned from compressed slides."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from spatialdb.errors import UserError
from spatialdb.nic.embeddings import load_grids, resolve_encoder, store_predictions
from spatialdb.store.catalog import find_slide
from spatialdb.store.db import connect


@click.group("slide-model")
def slide_model() -> None:
    """Learn slide-level targets on compressed slides (see `spatialdb compress`)."""


def read_labels(path: Path, id_column: str | None, columns: list[str]) -> dict[str, tuple]:
    """{slide name or id: (value of each column)} for the rows that have them all."""
    import pandas as pd

    try:
        table = pd.read_csv(path, skipinitialspace=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable CSV file ({exc})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    id_column = id_column or table.columns[0]
    for column in (id_column, *columns):
        if column not in table.columns:
            raise UserError(f"{path}: no column {column!r} (it has: {', '.join(table.columns)})")
    table = table[[id_column, *columns]].dropna()
    keys = table[id_column].astype(str)
    return dict(zip(keys, zip(*(table[c] for c in columns), strict=True), strict=True))


def labelled(grids, labels: dict) -> tuple[list, list]:
    """The grids whose slide (by name or id) has labels, and those labels."""
    chosen, values = [], []
    for grid in grids:
        key = grid.slide_name if grid.slide_name in labels else str(grid.slide_id)
        if key in labels:
            chosen.append(grid)
            values.append(labels[key])
    return chosen, values


def task_of(targets: list, task: str) -> str:
    if task != "auto":
        return task
    numeric = all(isinstance(t, int | float | np.number) for t in targets)
    return "regression" if numeric and len(set(targets)) > 10 else "classification"


def describe(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())


@slide_model.command()
@click.option("--labels", "labels_path", required=True, type=click.Path(path_type=Path))
@click.option("--target", required=True, help="The label column to learn.")
@click.option("--id-column", help="Column of slide names or ids (default: the first).")
@click.option(
    "--group-column",
    help="Keep the slides of one group (e.g. a patient ID) in the same fold.",
)
@click.option(
    "--task", type=click.Choice(["auto", "classification", "regression"]), default="auto",
    show_default=True,
)  # fmt: skip
@click.option("--encoder", help="Grids of this encoder: 'random' or a hash prefix (default: ours).")
@click.option(
    "--baseline/--no-baseline",
    default=True,
    help="Also cross-validate on the grids of the random encoder.",
)
@click.option("--folds", default=5, show_default=True)
@click.option("--epochs", default=80, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def train(
    obj, labels_path, target, id_column, group_column, task, encoder, baseline, folds, epochs,
    seed, output,
):  # fmt: skip
    """Cross-validate a CNN over the grids on a CSV of labels, then train it on all of them."""
    from inference import slide_model
    from inference.weights import default_sha256

    engine = connect(obj["db_url"])
    labels = read_labels(
        labels_path, id_column, [target, *([group_column] if group_column else [])]
    )
    sha = resolve_encoder(engine, encoder, default_sha256())
    grids, values = labelled(load_grids(engine, sha), labels)
    targets = [v[0] for v in values]
    groups = [v[1] for v in values] if group_column else None
    if len(grids) < folds * 2:
        raise UserError(
            f"only {len(grids)} compressed slide(s) have a {target!r} label; "
            f"compress the slides first (spatialdb compress SLIDE...)"
        )
    task = task_of(targets, task)
    settings = slide_model.Settings(epochs=epochs, seed=seed)
    embeddings, masks = [g.embeddings for g in grids], [g.tissue for g in grids]
    _, cv = slide_model.cross_validate(embeddings, masks, targets, task, folds, settings, groups)
    click.echo(
        f"{target} ({task}), {len(grids)} slides, {folds}-fold CV: {describe(cv)} "
        f"[{grids[0].encoder}]"
    )
    result = {"cv": cv}
    if baseline:
        random_sha = resolve_encoder(engine, "random", "") if _has_random(engine) else None
        if random_sha is None:
            click.echo(
                "spatialdb: note: no baseline: compress the slides with --random-encoder", err=True
            )
        else:
            base, base_values = labelled(
                load_grids(engine, random_sha, [g.slide_id for g in grids]), labels
            )
            _, base_cv = slide_model.cross_validate(
                [g.embeddings for g in base], [g.tissue for g in base],
                [v[0] for v in base_values], task, folds, settings,
                [v[1] for v in base_values] if group_column else None,
            )  # fmt: skip
            result["baseline_cv"] = base_cv
            click.echo(
                f"baseline, same CNN on {base[0].encoder} grids of {len(base)} slides: "
                f"{describe(base_cv)}"
            )
    model = slide_model.fit(embeddings, masks, targets, task, settings)
    model.info = {
        "target": target, "encoder_sha256": sha, "encoder": grids[0].encoder,
        "slides": len(grids), "folds": folds, "epochs": epochs, "seed": seed, **result,
    }  # fmt: skip
    output = output or Path(f"slide-model-{target.replace(' ', '_').replace('/', '_')}.pt")
    data = model.to_bytes()
    partial = output.with_name(output.name + ".partial")
    partial.write_bytes(data)
    partial.replace(output)
    click.echo(f"{output}: trained on {len(grids)} slides (sha256 {slide_model.sha256(data)[:12]})")


def _has_random(engine) -> bool:
    from spatialdb.nic.embeddings import encoders

    return any(e["encoder"].startswith("random") for e in encoders(engine))


@slide_model.command()
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("slides", nargs=-1)
@click.pass_obj
def predict(obj, model_path: Path, slides) -> None:
    """Predict MODEL's target for SLIDES (default: every slide compressed with its encoder) and
    store the predictions in the database."""
    from inference import slide_model

    if not model_path.is_file():
        raise UserError(f"{model_path}: no such file")
    data = model_path.read_bytes()
    try:
        model = slide_model.SlideModel.from_bytes(data)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(f"{model_path}: not a slide model ({type(exc).__name__})") from exc
    engine = connect(obj["db_url"])
    ids = [find_slide(engine, ref)["id"] for ref in slides] or None
    grids = load_grids(engine, model.info["encoder_sha256"], ids)
    if not grids:
        raise UserError("no slides compressed with this model's encoder: run spatialdb compress")
    predicted = model.predict([g.embeddings for g in grids], [g.tissue for g in grids])
    rows = []
    for grid, p in zip(grids, predicted, strict=True):
        if model.task == "classification":
            best = int(np.argmax(p))
            value, label = float(p[-1]), model.classes[best]
            details = {"probabilities": dict(zip(model.classes, map(float, p), strict=True))}
        else:
            value, label, details = float(p), None, {}
        rows.append({
            "slide_id": grid.slide_id, "model_sha256": slide_model.sha256(data),
            "model_name": model_path.name, "target": model.info["target"], "task": model.task,
            "value": value, "label": label, "details": details,
        })  # fmt: skip
    store_predictions(engine, rows)
    click.echo(f"{model_path.name}: {len(rows)} prediction(s) of {model.info['target']!r} stored")
