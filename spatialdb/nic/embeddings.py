"""Compressed slides in the database: NIC grids stored per slide and encoder, `.npy` exports,
and the predictions of slide-level models.

A grid is stored as raw little-endian bytes with its shape and dtype, beside a uint8 mask of the
cells that hold tissue, so that it travels with the rest of the slide's data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, Engine, text

from spatialdb.errors import UserError

STORE = """
INSERT INTO slide_embedding (slide_id, encoder_sha256, encoder, source_run_id, mpp, cell_px,
    rows, cols, channels, dtype, tissue_cells, embeddings, tissue)
VALUES (:slide_id, :encoder_sha256, :encoder, :source_run_id, :mpp, :cell_px, :rows, :cols,
    :channels, :dtype, :tissue_cells, :embeddings, :tissue)
ON CONFLICT (slide_id, encoder_sha256) DO UPDATE SET
    encoder = EXCLUDED.encoder, source_run_id = EXCLUDED.source_run_id, mpp = EXCLUDED.mpp,
    cell_px = EXCLUDED.cell_px, rows = EXCLUDED.rows, cols = EXCLUDED.cols,
    channels = EXCLUDED.channels, dtype = EXCLUDED.dtype, tissue_cells = EXCLUDED.tissue_cells,
    embeddings = EXCLUDED.embeddings, tissue = EXCLUDED.tissue, created_at = EXCLUDED.created_at
"""
LOAD = """
SELECT e.slide_id, s.name, e.encoder, e.encoder_sha256, e.rows, e.cols, e.channels, e.dtype,
       e.embeddings, e.tissue
FROM slide_embedding e JOIN slide s ON s.id = e.slide_id
WHERE e.encoder_sha256 = :encoder AND (CAST(:ids AS integer[]) IS NULL OR e.slide_id = ANY(:ids))
ORDER BY e.slide_id
"""
ENCODERS = """
SELECT encoder_sha256, encoder, count(*) AS slides FROM slide_embedding
GROUP BY 1, 2 ORDER BY max(created_at) DESC
"""


@dataclass
class StoredGrid:
    slide_id: int
    slide_name: str
    encoder: str
    encoder_sha256: str
    embeddings: np.ndarray  # (rows, cols, channels)
    tissue: np.ndarray  # (rows, cols) bool


def store_grid(
    conn: Connection,
    slide_id: int,
    embeddings: np.ndarray,
    tissue: np.ndarray,
    *,
    encoder: str,
    encoder_sha256: str,
    mpp: float,
    cell_px: int,
    source_run_id: int | None = None,
) -> None:
    """Store (or replace) a slide's grid for one encoder, in the caller's transaction."""
    if embeddings.ndim != 3 or tissue.shape != embeddings.shape[:2]:
        raise ValueError(f"a grid is (rows, cols, channels); got {embeddings.shape}")
    little = embeddings.astype(embeddings.dtype.newbyteorder("<"), copy=False)
    conn.execute(
        text(STORE),
        {
            "slide_id": slide_id, "encoder_sha256": encoder_sha256, "encoder": encoder,
            "source_run_id": source_run_id, "mpp": mpp, "cell_px": cell_px,
            "rows": embeddings.shape[0], "cols": embeddings.shape[1],
            "channels": embeddings.shape[2], "dtype": little.dtype.str,
            "tissue_cells": int(tissue.sum()), "embeddings": little.tobytes(),
            "tissue": tissue.astype(np.uint8).tobytes(),
        },
    )  # fmt: skip


def load_grids(engine: Engine, encoder_sha256: str, slide_ids: list[int] | None = None):
    """The stored grids of one encoder (optionally only some slides), in slide order."""
    with engine.connect() as conn:
        rows = conn.execute(text(LOAD), {"encoder": encoder_sha256, "ids": slide_ids}).mappings()
        grids = []
        for r in rows:
            shape = (r["rows"], r["cols"], r["channels"])
            grids.append(
                StoredGrid(
                    r["slide_id"], r["name"], r["encoder"], r["encoder_sha256"],
                    np.frombuffer(bytes(r["embeddings"]), dtype=r["dtype"]).reshape(shape),
                    np.frombuffer(bytes(r["tissue"]), dtype=np.uint8).reshape(shape[:2]) > 0,
                )
            )  # fmt: skip
    return grids


def encoders(engine: Engine) -> list[dict]:
    """Encoders with stored grids, the most recently used first."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(ENCODERS)).mappings()]


def resolve_encoder(engine: Engine, ref: str | None, default_sha256: str) -> str:
    """An encoder hash from `ref`: None (the default weights), 'random', or a hash prefix."""
    known = encoders(engine)
    if ref is None:
        return default_sha256
    if ref == "random":
        matches = [e for e in known if e["encoder"].startswith("random")]
    else:
        matches = [e for e in known if e["encoder_sha256"].startswith(ref)]
    if len(matches) != 1:
        listed = ", ".join(f"{e['encoder']} {e['encoder_sha256'][:12]}" for e in known) or "none"
        raise UserError(f"--encoder {ref!r} matches {len(matches)} stored encoders ({listed})")
    return matches[0]["encoder_sha256"]


def export_npy(grids: list[StoredGrid], out_dir: Path) -> list[Path]:
    """`NAME.npy` (rows, cols, channels) and `NAME.tissue.npy` per grid, plus `index.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for grid in grids:
        stem = f"{grid.slide_id}-{grid.slide_name}"
        np.save(out_dir / f"{stem}.npy", grid.embeddings)
        np.save(out_dir / f"{stem}.tissue.npy", grid.tissue)
        written.append(out_dir / f"{stem}.npy")
        index.append({
            "slide_id": grid.slide_id, "slide": grid.slide_name, "file": f"{stem}.npy",
            "tissue": f"{stem}.tissue.npy", "encoder": grid.encoder,
            "encoder_sha256": grid.encoder_sha256, "shape": list(grid.embeddings.shape),
        })  # fmt: skip
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return written


def store_predictions(engine: Engine, rows: list[dict]) -> None:
    """Replace the predictions of a model for the slides given (dicts with the table's columns)."""
    if not rows:
        return
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO slide_prediction (slide_id, model_sha256, model_name, target, task, "
                "value, label, details) VALUES (:slide_id, :model_sha256, :model_name, :target, "
                ":task, :value, :label, CAST(:details AS jsonb)) "
                "ON CONFLICT (slide_id, model_sha256) DO UPDATE SET value = EXCLUDED.value, "
                "label = EXCLUDED.label, details = EXCLUDED.details, "
                "created_at = EXCLUDED.created_at"
            ),
            [{**r, "details": json.dumps(r.get("details", {}))} for r in rows],
        )
