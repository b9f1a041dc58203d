"""`spatialdb compress SLIDE...` and `spatialdb compress export`: slides as NIC grids."""

from __future__ import annotations

from pathlib import Path

import click

from spatialdb.errors import UserError
from spatialdb.nic.embeddings import export_npy, load_grids, resolve_encoder
from spatialdb.pipeline.compress import compress_one, load_encoder
from spatialdb.pipeline.ingest import failure
from spatialdb.pipeline.slides import slide_paths
from spatialdb.store.catalog import find_slide
from spatialdb.store.db import connect


class DefaultGroup(click.Group):
    """A group whose arguments go to its `slides` command unless they name a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["slides", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup)
def compress() -> None:
    """Compress slides into grids of encoder embeddings (Neural Image Compression).

    \b
    spatialdb compress SLIDE...          one grid per slide, stored in the database
    spatialdb compress export OUT_DIR    the stored grids as .npy files
    """


@compress.command("slides", hidden=True)
@click.argument("slides", nargs=-1, required=True)
@click.option("--mpp", type=float, help="µm per pixel, for slides whose file does not record it.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Encoder weights file.")
@click.option("--random-encoder", is_flag=True, help="Use randomly initialised weights (baseline).")
@click.option("--seed", default=0, show_default=True, help="Seed of --random-encoder.")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--batch-size",
    type=int,
    help="Patches per forward pass (default: 8 of 512 px, fewer of larger patches).",
)
@click.pass_obj
def compress_slides(obj, slides, mpp, weights, random_encoder, seed, device, batch_size) -> int:
    """Compress SLIDES (files, directories or globs): each tissue cell of 128 px at 0.5 µm/px
    becomes the encoder's pooled bottleneck features; the grid is stored per slide and encoder."""
    from inference.compress import CompressError

    paths = slide_paths(slides)
    engine = connect(obj["db_url"])
    model, name = load_encoder(weights, random_encoder, seed, device)
    failed = 0
    for path in paths:
        try:
            slide_id, grid = compress_one(
                engine, path, model, name, mpp=mpp, device=device, batch_size=batch_size
            )
        except CompressError as exc:
            raise UserError(str(exc)) from exc
        except UserError as exc:
            failed += 1
            click.echo(f"spatialdb: error: {exc}", err=True)
            continue
        except Exception as exc:  # one slide's failure must not stop the others
            failed += 1
            click.echo(f"spatialdb: error: {failure(path, exc, 'compression')}", err=True)
            continue
        rows, cols, channels = grid.embeddings.shape
        click.echo(
            f"{path.name}: slide {slide_id}, {rows} x {cols} cells x {channels} ({name}), "
            f"{int(grid.tissue.sum())} with tissue"
        )
    if failed:
        click.echo(f"spatialdb: error: {failed} of {len(paths)} slide(s) failed", err=True)
    return 1 if failed else 0


@compress.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--slide", "slides", multiple=True, help="Slide id, name or path (default: all).")
@click.option(
    "--encoder", help="'random', or a prefix of the encoder's hash (default: the shipped weights)."
)
@click.pass_obj
def export(obj: dict, out_dir: Path, slides, encoder) -> None:
    """Write stored grids as OUT_DIR/ID-NAME.npy (rows, cols, channels), a tissue mask each and
    index.json."""
    from inference.weights import default_sha256

    engine = connect(obj["db_url"])
    sha = resolve_encoder(engine, encoder, default_sha256())
    ids = [find_slide(engine, ref)["id"] for ref in slides] or None
    grids = load_grids(engine, sha, ids)
    if not grids:
        raise UserError("no stored grids for that encoder: run spatialdb compress first")
    written = export_npy(grids, out_dir)
    click.echo(f"{len(written)} grid(s) -> {out_dir} (index.json lists them)")
