"""`spatialdb ingest --scheduler ADDRESS`: slides fanned out to a Dask distributed cluster.

Each slide is one task. A worker process loads the model and opens its database engine once, on
its first slide, and keeps them for the next ones; it ingests the slide exactly as the serial
path does and loads it into the shared database, one atomic run per slide. Dask workers are
daemonic processes, which cannot start processes of their own, so post-processing runs in the
worker (`workers=0`). Workers need this package installed and the slide files at the same paths.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from spatialdb.errors import UserError

#: Seconds to wait for the scheduler before giving up.
CONNECT_TIMEOUT_S = 10

#: Per worker process: (weights, device, compress) -> model, and database URL -> engine.
_models: dict = {}
_engines: dict = {}


def ingest_on_cluster(
    address: str, db_url: str, paths: list[Path], **options
) -> Iterator[tuple[int, object]]:
    """Ingest `paths` on the cluster at `address` into the database at `db_url`, yielding
    `(index in paths, Outcome)` as slides finish. `options` are those of `ingest_slide` plus
    `weights`. `UserError` if the scheduler cannot be reached."""
    from distributed import Client, as_completed

    from spatialdb.pipeline.ingest import Outcome
    from spatialdb.store.db import first_line

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        message = f"cannot reach the Dask scheduler at {address}: {first_line(exc)}"
        raise UserError(message) from None
    with client:
        futures = {
            client.submit(_ingest_task, str(path.resolve()), db_url, options, pure=False): k
            for k, path in enumerate(paths)
        }
        for future in as_completed(futures):
            k = futures[future]
            try:
                outcome = future.result()
                outcome.path = paths[k]
            except UserError as exc:  # the worker could not load the model or use the database
                outcome = Outcome(paths[k], "failed", str(exc))
            except Exception as exc:  # the worker died: this slide failed, the others go on
                message = f"{paths[k]}: {type(exc).__name__}: {first_line(exc)}"
                outcome = Outcome(paths[k], "failed", message)
            yield k, outcome


def _ingest_task(path: str, db_url: str, options: dict):
    """One slide on a Dask worker: its Outcome (failures included, as in the serial path)."""
    from spatialdb.pipeline.ingest import ingest_one, load_model
    from spatialdb.store.db import connect

    options = dict(options)
    key = (options.pop("weights"), options["device"], options["compress"])
    if key not in _models:
        _models[key] = load_model(*key[:2], embeddings=key[2])
    if db_url not in _engines:
        _engines[db_url] = connect(db_url)
    logging.getLogger(__name__).info("ingesting %s", path)
    return ingest_one(_engines[db_url], Path(path), _models[key], workers=0, **options)
