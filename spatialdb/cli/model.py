"""`spatialdb train` and `spatialdb evaluate`: the model's commands (torch imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from spatialdb.errors import UserError


@click.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="TOML training configuration (see configs/cpu-multiscale.toml).",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--data", help="Dataset directory (overrides the config).")
@click.option("--out", help="Output directory (overrides the config).")
@click.option("--device", help="cpu or cuda (overrides the config).")
@click.option("--steps", type=int, help="Training steps (overrides the config).")
@click.option(
    "--minutes",
    type=float,
    help="Fit the run into this many minutes, at most --steps (overrides the config).",
)
@click.option(
    "--pack",
    "pack_path",
    type=click.Path(dir_okay=False),
    help="Write the run's training data as one .tar.xz instead of training (for a machine that "
    "cannot see the datasets; train there with --data on it unpacked).",
)
def train(config_path, resume, data, out, device, steps, minutes, pack_path) -> None:
    """Train the multi-task network; writes OUT/weights.pt."""
    from inference.datasets import DatasetError
    from inference.train import TrainConfig, run

    try:
        config = TrainConfig.from_toml(
            config_path, data=data, out=out, device=device, steps=steps, minutes=minutes
        )
        run(config, resume=resume, pack_to=pack_path, log=lambda line: click.echo(line))
    except (OSError, ValueError, DatasetError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option(
    "--weights",
    "weights_path",
    type=click.Path(dir_okay=False),
    help="Weights file (default: the shipped CPU weights).",
)
@click.option(
    "--held-out",
    is_flag=True,
    help="Only the images the weights' training held out of this dataset.",
)
@click.option(
    "--held-out-of",
    "split_path",
    type=click.Path(dir_okay=False),
    help="With --held-out: the images this other weights file held out (to compare two files).",
)
@click.option("--mpp", type=float, help="µm/px of the images (default: the dataset's own).")
@click.option(
    "--scan-mpp",
    type=float,
    help="Predict images finer than this µm/px as a scan at it would give them (0.5: 20x).",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--flips", is_flag=True, help="Average the network's maps over each tile's 4 flips.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Also write the per-image figures and summary as JSON.",
)
@click.option("--record", is_flag=True, help="Store the summary in the weights file's metrics.")
def evaluate(
    folder, weights_path, held_out, split_path, mpp, scan_mpp, device, flips, json_path, record
) -> None:
    """Score the model on FOLDER (GlaS, MoNuSeg or CoNSeP layout): gland object F1/Dice/Hausdorff
    (all, benign and malignant images), or nuclei Dice/AJI/PQ/F1 (and per-type F1 with the counts
    behind it on CoNSeP)."""
    from inference import weights as weights_file
    from inference.datasets import DatasetError
    from inference.evaluate import BAR
    from inference.evaluate import evaluate as run_evaluation

    path = Path(weights_path) if weights_path else weights_file.DEFAULT_WEIGHTS
    try:
        net, info = weights_file.load(path)
        split = weights_file.read(split_path)[0] if split_path else None
        report = run_evaluation(
            folder,
            net.to(device),
            info,
            held_out_only=held_out,
            split=split,
            mpp=mpp,
            scan_mpp=scan_mpp,
            device=device,
            flips=flips,
            progress=lambda name: click.echo(f"  {name}", err=True),
        )
    except (weights_file.WeightsError, DatasetError, OSError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    layout, summary = report["layout"], report["summary"]
    columns = [key for key in report["images"][0] if key != "name"]
    click.echo("image".ljust(28) + "".join(key.rjust(17) for key in columns))
    for row in report["images"]:
        click.echo(row["name"][:27].ljust(28) + "".join(_cell(row[key]) for key in columns))
    click.echo(f"{layout} summary over {summary['images']} images:")
    for key, value in summary.items():
        if key == "images":
            continue
        if isinstance(value, dict):
            _echo_table(key, value)
            continue
        bar = BAR[layout].get(key)
        verdict = (
            "" if bar is None else f"  (bar {bar:.2f}: {'met' if value >= bar else 'NOT met'})"
        )
        click.echo(f"  {key:18s} {value:.4f}{verdict}")
    if json_path:
        Path(json_path).write_text(json.dumps({"weights": str(path), **report}, indent=2))
    if record:
        metrics = dict(info.metrics)
        metrics[layout] = {
            "folder": str(folder),
            "held_out_only": held_out,
            "flips": flips,
            **summary,
        }
        weights_file.update(path, metrics=metrics)
        click.echo(f"recorded in {path}")


def _echo_table(title: str, table: dict) -> None:
    """A summary's nested figures: a row per group (dicts), or one row of named values."""
    click.echo(f"  {title}:")
    rows = table if all(isinstance(v, dict) for v in table.values()) else {"": table}
    columns = list(next(iter(rows.values())))
    width = max(17, *(len(key) + 2 for key in columns))
    click.echo("    " + "".ljust(12) + "".join(key.rjust(width) for key in columns))
    for name, row in rows.items():
        click.echo("    " + name.ljust(12) + "".join(_cell(row[key], width) for key in columns))


def _cell(value, width: int = 17) -> str:
    if isinstance(value, str):
        return value.rjust(width)
    return f"{value:{width}.4f}" if isinstance(value, float) else f"{value:{width}d}"
