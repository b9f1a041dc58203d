"""NIC on GlaS: benign vs malignant from compressed images, multi-task encoder vs random encoder.

Each GlaS training image is one "slide". The grids of both encoders are compressed first if the
database lacks them (`spatialdb compress DIR --mpp 0.62`, then with `--random-encoder`). Then, for
each of --seeds cross-validation seeds, the same CNN (`inference.slide_model`) is cross-validated on
both encoders' grids with folds that never split a patient, and the out-of-fold AUC is reported

  - over all images, and
  - over the images that the shipped weights' training held out. The encoder's tissue-class head
    was trained on labels derived from the grade of the other images, so only these are free of
    that leak (their patients still appear in the encoder's training, as GlaS is designed).

Medians and ranges over the seeds; the random encoder is the baseline measured in the same run.

    python benchmarks/nic_glas.py [--glas ../shared/data/glas] [--seeds 5] [--epochs 80]

Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from inference import slide_model
from inference.weights import DEFAULT_WEIGHTS, default_sha256, load
from spatialdb.cli.slide_model import read_labels
from spatialdb.nic.embeddings import encoders, load_grids
from spatialdb.store.db import connect

HERE = Path(__file__).resolve().parent


def grids_of(engine, sha: str, names: set[str]) -> dict:
    return {g.slide_name: g for g in load_grids(engine, sha) if g.slide_name in names}


def ensure_compressed(engine, glas: Path, names: set[str]) -> tuple[str, str]:
    """(our encoder's hash, the random encoder's hash), compressing what is missing."""
    ours = default_sha256()
    if len(grids_of(engine, ours, names)) < len(names):
        compress(glas)
    if not any(e["encoder"].startswith("random") for e in encoders(engine)):
        compress(glas, "--random-encoder")
    random_sha = next(
        e["encoder_sha256"] for e in encoders(engine) if e["encoder"].startswith("random")
    )
    return ours, random_sha


def compress(glas: Path, *options: str) -> None:
    command = [sys.executable, "-m", "spatialdb", "compress", str(glas / "images"), "--mpp", "0.62"]
    subprocess.run([*command, *options], check=True, stdout=subprocess.DEVNULL)


def auc(predicted: np.ndarray, targets: list, keep: list[bool]) -> float:
    chosen = [k for k, flag in enumerate(keep) if flag]
    return slide_model.metrics(predicted[chosen], [targets[k] for k in chosen], "classification")[
        "auc"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glas", type=Path, default=HERE.parent.parent / "shared/data/glas")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=80)
    args = parser.parse_args()
    if not (args.glas / "Grade.csv").is_file():
        sys.exit(f"nic_glas: error: {args.glas}/Grade.csv not found (--glas)")

    labels = read_labels(args.glas / "Grade.csv", "name", ["grade (GlaS)", "patient ID"])
    _, info = load(DEFAULT_WEIGHTS)
    held_out = set(info.training["data"]["glas"]["held_out"])
    engine = connect()
    ours, random_sha = ensure_compressed(engine, args.glas, set(labels))

    names = sorted(labels)
    targets = [labels[n][0] for n in names]
    groups = [labels[n][1] for n in names]
    unseen = [n in held_out for n in names]
    print(
        f"GlaS: {len(names)} images of {len(set(groups))} patients "
        f"({targets.count('malignant')} malignant), {sum(unseen)} held out from the encoder; "
        f"{args.folds}-fold CV by patient, {args.seeds} seeds, {args.epochs} epochs"
    )
    results = {}
    for name, sha in (("multi-task encoder", ours), ("random encoder", random_sha)):
        grids = grids_of(engine, sha, set(names))
        embeddings = [grids[n].embeddings for n in names]
        masks = [grids[n].tissue for n in names]
        every, unseen_only = [], []
        for seed in range(args.seeds):
            settings = slide_model.Settings(epochs=args.epochs, seed=seed)
            predicted, _ = slide_model.cross_validate(
                embeddings, masks, targets, "classification", args.folds, settings, groups
            )
            every.append(auc(predicted, targets, [True] * len(names)))
            unseen_only.append(auc(predicted, targets, unseen))
        results[name] = (every, unseen_only)
        print(
            f"{name:>20}: AUC all images {statistics.median(every):.3f} "
            f"[{min(every):.3f}-{max(every):.3f}], held-out images "
            f"{statistics.median(unseen_only):.3f} [{min(unseen_only):.3f}-{max(unseen_only):.3f}]"
        )
    (ours_all, ours_unseen), (rand_all, rand_unseen) = results.values()
    print(
        f"median AUC, multi-task minus random: all images "
        f"{statistics.median(ours_all) - statistics.median(rand_all):+.3f}, held-out images "
        f"{statistics.median(ours_unseen) - statistics.median(rand_unseen):+.3f}"
    )


if __name__ == "__main__":
    main()
