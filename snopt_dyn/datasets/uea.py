"""UEA multivariate time-series classification data (``.ts`` format).

Two small UEA sets are vendored (JapaneseVowels, BasicMotions; see DATA.md);
any other UEA set -- e.g. CharacterTrajectories or ArticularyWordRecognition
used in the SNOpt paper -- can be read from a user-supplied ``.ts`` file with
:func:`load_uea_ts` (nothing is downloaded).

Format (sktime/UEA ``.ts``): ``#`` comment lines; header lines starting with
``@`` (``@problemName``, ``@dimensions``, ``@equalLength``, ``@classLabel true
<labels...>``, ...); after ``@data`` one line per case, the dimensions
separated by ``:``, the values of one dimension by ``,``, the class label last;
``?`` marks a missing value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from os import PathLike

import numpy as np

from ._io import check_split, load_arrays
from .timeseries import TimeSeriesData, channel_statistics, from_sequences, standardize

__all__ = [
    "parse_ts",
    "sort_class_labels",
    "load_uea_ts",
    "load_japanese_vowels",
    "load_basic_motions",
]


def _to_float(token: str, line_number: int) -> float:
    token = token.strip()
    if token == "?":
        return math.nan
    try:
        return float(token)
    except ValueError:
        raise ValueError(f"line {line_number}: cannot parse value {token!r}") from None


def parse_ts(
    lines: Iterable[str],
) -> tuple[list[np.ndarray], list[str], dict[str, str], list[str] | None]:
    """Parse the lines of a ``.ts`` file.

    Returns:
        ``(series, labels, header, header_classes)``: one float64 ``(L_i, C)``
        array per case (``NaN`` for ``?``), the class label string of each
        case, the header as ``{lower-case key: rest of line}`` and the class
        labels declared by ``@classLabel true ...`` (None if not declared).

    Raises:
        ValueError: on time-stamped (``@timeStamps true``) or unlabelled files,
            inconsistent dimension counts, or cases whose dimensions have
            different lengths.
    """
    header: dict[str, str] = {}
    header_classes: list[str] | None = None
    dimensions: int | None = None
    in_data = False
    series: list[np.ndarray] = []
    labels: list[str] = []
    for line_number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise ValueError(f"line {line_number}: expected a header line before @data")
            key, _, rest = line[1:].partition(" ")
            if key.lower() == "data":
                in_data = True
                header_classes, dimensions = _check_header(header)
            else:
                header[key.lower()] = rest.strip()
            continue
        case, label = _parse_case(line, line_number, dimensions)
        dimensions = case.shape[1]
        series.append(case)
        labels.append(label)
    if not in_data:
        raise ValueError("no @data section found")
    if not series:
        raise ValueError("no cases after @data")
    return series, labels, header, header_classes


def _check_header(header: dict[str, str]) -> tuple[list[str] | None, int | None]:
    """The declared class labels and dimension count; raises on files this loader does not read."""
    if header.get("timestamps", "false").lower() == "true":
        raise ValueError("time-stamped .ts files (@timeStamps true) are not supported")
    class_tokens = header.get("classlabel", "false").split()
    if not class_tokens or class_tokens[0].lower() != "true":
        raise ValueError("only classification files (@classLabel true ...) are supported")
    if "dimensions" in header:
        dimensions = int(header["dimensions"])
    elif header.get("univariate", "").lower() == "true":
        dimensions = 1
    else:
        dimensions = None
    return class_tokens[1:] or None, dimensions


def _parse_case(line: str, line_number: int, dimensions: int | None) -> tuple[np.ndarray, str]:
    """One ``dim1:dim2:...:label`` data line as an ``(L, C)`` array and its label."""
    fields = line.split(":")
    if len(fields) < 2:
        raise ValueError(f"line {line_number}: expected dimensions and a class label")
    *dims, label = fields
    if dimensions is not None and len(dims) != dimensions:
        raise ValueError(f"line {line_number}: {len(dims)} dimensions, expected {dimensions}")
    columns = [[_to_float(v, line_number) for v in d.split(",")] for d in dims]
    if any(len(c) != len(columns[0]) for c in columns):
        raise ValueError(f"line {line_number}: dimensions of one case have different lengths")
    return np.asarray(columns, dtype=np.float64).T, label.strip()


def sort_class_labels(labels: Iterable[str]) -> list[str]:
    """Unique labels in sorted order: numeric if all parse as numbers, else lexicographic.

    Why numeric: labels ``"1".."10"`` should map to indices in their natural
    order (plain string order would put ``"10"`` before ``"2"``).
    """
    unique = set(labels)
    try:
        return sorted(unique, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(unique)


def load_uea_ts(path: str | PathLike[str], classes: Sequence[str] | None = None) -> TimeSeriesData:
    """Load a user-supplied UEA ``.ts`` classification file.

    Why: the paper's own UEA sets (CharacterTrajectories,
    ArticularyWordRecognition, ...) are too large to vendor; pass their
    ``_TRAIN.ts``/``_TEST.ts`` files here.

    Args:
        path: the ``.ts`` file.
        classes: the class labels in index order. Default: the labels declared
            in ``@classLabel`` (or, if none, those occurring), sorted with
            :func:`sort_class_labels`. Train and test files of one problem
            declare the same labels, so both get the same mapping.

    Returns:
        The padded series (see :class:`TimeSeriesData`); ``?`` values are
        ``NaN``; ``mask`` is False at steps where every channel is missing.
    """
    with open(path, encoding="utf-8", errors="replace") as handle:
        series, labels, _, header_classes = parse_ts(handle)
    if classes is None:
        classes = sort_class_labels(header_classes if header_classes else labels)
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"class labels {unknown} not among the classes {list(classes)}")
    return from_sequences(series, [index[label] for label in labels], list(classes))


def _load_vendored(name: str, split: str, standardize_: bool) -> TimeSeriesData:
    check_split(split)
    arrays = load_arrays(name)
    classes = [str(c) for c in arrays["classes"]]

    def build(which: str) -> TimeSeriesData:
        lengths = arrays[f"{which}_lengths"]
        values = np.split(arrays[f"{which}_values"], np.cumsum(lengths)[:-1])
        return from_sequences(values, arrays[f"{which}_labels"], classes)

    data = build(split)
    if standardize_:
        mean, std = channel_statistics(data if split == "train" else build("train"))
        data = standardize(data, mean, std)
    return data


def load_japanese_vowels(split: str = "train", *, standardize: bool = False) -> TimeSeriesData:
    """UEA JapaneseVowels: 12 LPC cepstrum channels, lengths 7--29, 9 speakers.

    Why: a small real variable-length set (270 train / 370 test) for testing
    Neural CDE training on irregular data without any download.

    Args:
        split: ``"train"`` or ``"test"`` (the original UEA split).
        standardize: if True, standardise each channel with the mean/std of the
            observed values of the *train* split (padding excluded).
    """
    return _load_vendored("japanese_vowels.npz", split, standardize)


def load_basic_motions(split: str = "train", *, standardize: bool = False) -> TimeSeriesData:
    """UEA BasicMotions: 6 channels (3-D accelerometer + gyroscope), length 100, 4 classes.

    Why: a small real equal-length set (40 train / 40 test) for quick tests
    of time-series classifiers and of the irregular-sampling protocol.

    Args:
        split: ``"train"`` or ``"test"`` (the original UEA split).
        standardize: if True, standardise each channel with the mean/std of the
            *train* split.
    """
    return _load_vendored("basic_motions.npz", split, standardize)
