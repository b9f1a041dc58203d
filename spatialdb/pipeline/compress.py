"""Slide files compressed into NIC grids (`spatialdb compress`): the shared encoder alone over
each slide's tissue tiles, each grid stored together with its slide's row."""

from __future__ import annotations

from pathlib import Path

from spatialdb.nic.embeddings import store_grid
from spatialdb.pipeline.ingest import load_model
from spatialdb.pipeline.slides import open_reader, slide_record
from spatialdb.store.catalog import fingerprint, upsert_slide


def load_encoder(weights: str | None, random_encoder: bool, seed: int, device: str):
    """(CerberusModel, encoder name): the shipped weights, a weights file, or random weights."""
    from inference import weights as weights_io
    from inference.engine import CerberusModel

    model, path = load_model(weights, device, backend="torch")  # it runs the encoder alone
    if not random_encoder:
        return model, path.name
    # The baseline: the same architecture, untrained.
    net, info = weights_io.random_weights(model.info.preset, seed)
    return CerberusModel(net.to(device), info), f"random (seed {seed})"


def compress_one(
    engine,
    path: Path,
    encoder,
    name: str,
    *,
    mpp: float | None,
    device: str,
    batch_size: int | None,
):
    """(slide id, `inference.compress.SlideGrid`) of one slide compressed and stored: its row (new
    or refreshed) and its grid in one transaction, so that a failure stores neither. `UserError`
    for a file that is not a usable slide, `CompressError` for an encoder that cannot compress."""
    from inference.compress import compress_slide
    from inference.slide import tissue_mask

    reader = open_reader(path, mpp)
    mask = tissue_mask(reader)
    grid = compress_slide(reader, encoder, mask, device=device, batch_size=batch_size)
    record = slide_record(path, reader, fingerprint(path))
    with engine.begin() as conn:
        slide_id = upsert_slide(conn.connection.cursor(), record)
        store_grid(
            conn, slide_id, grid.embeddings, grid.tissue, encoder=name,
            encoder_sha256=grid.encoder_sha256, mpp=grid.mpp, cell_px=grid.cell_px,
        )  # fmt: skip
    return slide_id, grid
