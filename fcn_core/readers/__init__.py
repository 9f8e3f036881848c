"""Real wafer-map readers: each turns a published file format into the wafer table.

The tables then go through the same validation as any other drop (``fcn_core.validate``).
``read_any`` picks the reader from the file extension (or ``fmt``), for the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ..table import WaferTableError, read_parquet
from ._common import PathLike, ReaderError, UntrustedFileError
from .g85 import read_g85
from .mixedwm38 import MIXEDWM38_LABELS, read_mixedwm38
from .wm811k import read_wm811k_pickle

__all__ = [
    "FORMATS", "MIXEDWM38_LABELS", "ReaderError", "UntrustedFileError", "detect_format", "read_any",
    "read_g85", "read_mixedwm38", "read_wm811k_pickle",
]

# format name -> file extensions it is chosen for
FORMATS: dict[str, tuple[str, ...]] = {
    "wm811k": (".pkl", ".pickle"),
    "mixedwm38": (".npz",),
    "g85": (".xml",),
    "parquet": (".parquet",),
}


def detect_format(path: PathLike) -> str:
    """Format name from the extension; a folder is G85 when it holds .xml files, else Parquet."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "g85" if any(f.suffix.lower() == ".xml" for f in p.rglob("*")) else "parquet"
    suffix = p.suffix.lower()
    for name, suffixes in FORMATS.items():
        if suffix in suffixes:
            return name
    known = ", ".join(f"{n} ({'/'.join(s)})" for n, s in FORMATS.items())
    raise ReaderError(f"{p}: cannot tell the format from {suffix or 'no extension'!r}; "
                      f"pass fmt= one of {known}")


def read_any(path: PathLike, *, fmt: str | None = None, trust: bool = False) -> pa.Table:
    """Read one file (or folder) of any supported format into a wafer table.

    ``trust`` is passed to the pickle reader only; every other format is data, never code.
    """
    name = fmt.lower() if fmt else detect_format(path)
    if name == "wm811k":
        return read_wm811k_pickle(path, trust=trust)
    if name == "mixedwm38":
        return read_mixedwm38(path)
    if name == "g85":
        return read_g85(path)
    if name == "parquet":
        try:
            return read_parquet(path)
        except WaferTableError as exc:
            raise ReaderError(str(exc)) from exc
    raise ReaderError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
