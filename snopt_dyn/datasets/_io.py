"""Reading (and, for the build script, writing) the vendored ``.npz`` files."""

from __future__ import annotations

import functools
import io
import zipfile
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"

_SPLITS = {"train", "test"}


def check_split(split: str, allowed: set[str] = _SPLITS) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {sorted(allowed)}, got {split!r}")
    return split


@functools.lru_cache(maxsize=None)
def _read(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA_DIR / name, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


def load_arrays(name: str) -> dict[str, np.ndarray]:
    """Arrays of a vendored file (cached; read-only -- copy before mutating)."""
    return _read(name)


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but byte-for-byte reproducible.

    ``np.savez_compressed`` stamps the current time into the zip headers, so
    rebuilding would change the sha256; here every entry gets a fixed date.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compresslevel=9)
