"""Tests of the vendored data sets and loaders in ``snopt_dyn.datasets``."""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import snopt_dyn.datasets as ds
from snopt_dyn.datasets import (
    channel_statistics,
    drop_observations,
    load_basic_motions,
    load_diamonds,
    load_digits,
    load_japanese_vowels,
    load_mnist_subset,
    load_uea_ts,
    standardize,
    with_time_channel,
)

# sha256 of the vendored files (also listed in DATA.md). A change of the data
# must be deliberate: rebuild with build_data.py and update both places.
CHECKSUMS = {
    "basic_motions.npz": "2939da3b75d3513dfb39454fcd783776243566beb53c6d9b63ad4ea458e8477a",
    "diamonds.npz": "35a0fd0f80d4c65453396af76b7c83b943359ac899e81b1f0168ec4f76fb04db",
    "digits.npz": "2ef759b21973ace349df5b4ada35127541f2b86eafc4a5760dc42e5275bb4521",
    "japanese_vowels.npz": "09ab03a1eb0b0fe07c4d81a1ecba22616eab45821998adcdbacfc440e884a9aa",
    "mnist_5k.npz": "d252ab908febaff12138d8a55998b10beff344cfdd1bf2bf9a2d63589c134e13",
}


# ---------------------------------------------------------------- files


def test_data_dir_is_next_to_the_module() -> None:
    assert ds.DATA_DIR == Path(ds.__file__).parent / "data"
    assert sorted(p.name for p in ds.DATA_DIR.glob("*.npz")) == sorted(CHECKSUMS)
    assert (Path(ds.__file__).parent / "DATA.md").is_file()


@pytest.mark.parametrize("name", sorted(CHECKSUMS))
def test_checksum(name: str) -> None:
    path = ds.DATA_DIR / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CHECKSUMS[name]
    assert path.stat().st_size < 1_000_000


def test_checksums_listed_in_data_md() -> None:
    text = (ds.DATA_DIR.parent / "DATA.md").read_text()
    for digest in CHECKSUMS.values():
        assert digest in text


# ---------------------------------------------------------------- UEA


def _check_padding(data: ds.TimeSeriesData) -> None:
    """Positions after the end repeat the last observation; times repeat L-1."""
    steps = torch.arange(data.max_length)
    for i in range(len(data)):
        length = int(data.lengths[i])
        tail = data.values[i, length:]
        assert torch.equal(tail, data.values[i, length - 1].expand_as(tail))
        assert torch.equal(data.times[i, :length], steps[:length].float())
        assert torch.all(data.times[i, length:] == length - 1)
        assert data.mask[i, :length].all() and not data.mask[i, length:].any()


def test_japanese_vowels() -> None:
    train, test = load_japanese_vowels("train"), load_japanese_vowels("test")
    assert (len(train), len(test)) == (270, 370)
    for data in (train, test):
        assert data.values.dtype == torch.float32 and data.times.dtype == torch.float32
        assert data.lengths.dtype == torch.int64 and data.labels.dtype == torch.int64
        assert data.mask.dtype == torch.bool
        assert data.num_channels == 12 and data.num_classes == 9
        assert data.classes == [str(k) for k in range(1, 10)]
        assert data.max_length == int(data.lengths.max())
        assert not torch.isnan(data.values).any()
        assert int(data.mask.sum()) == int(data.lengths.sum())
        _check_padding(data)
    lengths = torch.cat([train.lengths, test.lengths])
    assert (int(lengths.min()), int(lengths.max())) == (7, 29)
    assert torch.bincount(train.labels).tolist() == [30] * 9
    assert torch.bincount(test.labels, minlength=9).tolist() == [31, 35, 88, 44, 29, 24, 40, 50, 29]


def test_basic_motions() -> None:
    for split in ("train", "test"):
        data = load_basic_motions(split)
        assert tuple(data.values.shape) == (40, 100, 6)
        assert data.lengths.tolist() == [100] * 40
        assert data.classes == ["Badminton", "Running", "Standing", "Walking"]
        assert torch.bincount(data.labels).tolist() == [10] * 4
        assert bool(data.mask.all()) and not torch.isnan(data.values).any()


def test_invalid_split() -> None:
    with pytest.raises(ValueError):
        load_japanese_vowels("val")
    with pytest.raises(ValueError):
        load_diamonds("validation")


def test_standardize_uses_train_statistics() -> None:
    raw_train, raw_test = load_japanese_vowels("train"), load_japanese_vowels("test")
    mean, std = channel_statistics(raw_train)
    # statistics ignore the padding: compare with the concatenated observations
    observed = torch.cat([raw_train.values[i, : raw_train.lengths[i]] for i in range(270)])
    torch.testing.assert_close(mean, observed.mean(0))
    torch.testing.assert_close(std, observed.std(0, unbiased=False))
    train = load_japanese_vowels("train", standardize=True)
    test = load_japanese_vowels("test", standardize=True)
    m, s = channel_statistics(train)
    torch.testing.assert_close(m, torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(s, torch.ones(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(test.values, standardize(raw_test, mean, std).values)
    _check_padding(test)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_drop_observations(fraction: float) -> None:
    data = load_japanese_vowels("train")
    before = data.values.clone()
    dropped = drop_observations(data, fraction, seed=3)
    assert torch.equal(data.values, before)  # input untouched
    expected = data.lengths - torch.tensor([math.floor(fraction * int(n) + 1e-9) for n in data.lengths])
    assert torch.equal(dropped.mask.sum(1), expected)
    assert torch.equal(dropped.times, data.times) and torch.equal(dropped.lengths, data.lengths)
    inside = torch.arange(data.max_length)[None, :] < data.lengths[:, None]
    nan_rows = torch.isnan(dropped.values).all(-1)
    assert torch.equal(nan_rows, inside & ~dropped.mask)  # whole steps are dropped
    assert not torch.isnan(dropped.values).any(-1)[~nan_rows].any()
    kept = dropped.mask[:, :, None].expand_as(before)
    assert torch.equal(dropped.values[kept], before[kept])
    # padding repeats the last *remaining* observation (no dropped value leaks)
    for i in range(len(data)):
        last = int(torch.nonzero(dropped.mask[i]).max())
        tail = dropped.values[i, int(data.lengths[i]) :]
        assert torch.equal(tail, dropped.values[i, last].expand_as(tail))
    # deterministic for a seed, different for another seed
    again = drop_observations(data, fraction, seed=3)
    assert torch.equal(again.values.nan_to_num(99.0), dropped.values.nan_to_num(99.0))
    other = drop_observations(data, fraction, seed=4)
    assert not torch.equal(other.mask, dropped.mask)


def test_drop_observations_equal_length() -> None:
    dropped = drop_observations(load_basic_motions("test"), 0.3, seed=0)
    assert dropped.mask.sum(1).tolist() == [70] * 40
    assert dropped.num_classes == 4
    with pytest.raises(ValueError):
        drop_observations(dropped, 1.0)


def test_with_time_channel() -> None:
    data = drop_observations(load_japanese_vowels("test"), 0.5, seed=0)
    x = with_time_channel(data)
    assert tuple(x.shape) == (370, 29, 13)
    time = x[..., 0]
    assert not torch.isnan(time).any()
    assert float(time.min()) == 0.0 and float(time.max()) == 1.0
    assert (time[:, 1:] >= time[:, :-1]).all()
    assert torch.equal(x[..., 1:].nan_to_num(99.0), data.values.nan_to_num(99.0))
    torch.testing.assert_close(with_time_channel(data, time_scale=28.0), x, equal_nan=True)


def test_subset() -> None:
    data = load_basic_motions("train")
    batch = data.subset([3, 0])
    assert len(batch) == 2 and torch.equal(batch.values[1], data.values[0])
    assert batch.classes == data.classes


TS_TEXT = """# a tiny hand-written .ts file
@problemName Tiny
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength false
@classLabel true b a c
@data
1.0,2.0,3.0:10,20,30:b
4.5,?:40,50:a
?,7:?,70:b
"""


def test_load_uea_ts(tmp_path: Path) -> None:
    path = tmp_path / "Tiny_TRAIN.ts"
    path.write_text(TS_TEXT)
    data = load_uea_ts(path)
    assert data.classes == ["a", "b", "c"]  # sorted; "c" declared but absent
    assert data.num_classes == 3
    assert data.labels.tolist() == [1, 0, 1]
    assert data.lengths.tolist() == [3, 2, 2]
    assert tuple(data.values.shape) == (3, 3, 2)
    nan = float("nan")
    expected = torch.tensor(
        [
            [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]],
            [[4.5, 40.0], [nan, 50.0], [4.5, 50.0]],  # padding: last observed per channel
            [[nan, nan], [7.0, 70.0], [7.0, 70.0]],
        ]
    )
    torch.testing.assert_close(data.values, expected, equal_nan=True)
    series, labels = data.as_lists()  # as the file has them: no padding, the labels' own names
    assert [x.shape for x in series] == [(3, 2), (2, 2), (2, 2)] and labels.tolist() == ["b", "a", "b"]
    np.testing.assert_array_equal(series[1], [[4.5, 40.0], [np.nan, 50.0]])
    assert data.mask.tolist() == [[True, True, True], [True, True, False], [False, True, False]]
    assert data.times.tolist() == [[0.0, 1.0, 2.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    mean, std = channel_statistics(data)
    torch.testing.assert_close(mean, torch.tensor([17.5 / 5, 220.0 / 6]))
    # an explicit class list fixes the mapping (e.g. shared by train and test)
    assert load_uea_ts(path, classes=["c", "b", "a"]).labels.tolist() == [1, 2, 1]


def test_load_uea_ts_numeric_labels_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "Numeric.ts"
    path.write_text("@classLabel true 10 2 1\n@data\n1,2:10\n3:2\n4,5,6:1\n")
    data = load_uea_ts(path)
    assert data.classes == ["1", "2", "10"] and data.labels.tolist() == [2, 1, 0]
    assert data.num_channels == 1 and data.lengths.tolist() == [2, 1, 3]
    bad = {
        "stamps.ts": "@timeStamps true\n@classLabel true 1\n@data\n(0,1),(1,2):1\n",
        "ragged.ts": "@dimensions 2\n@classLabel true 1\n@data\n1,2:3:1\n",
        "dims.ts": "@dimensions 2\n@classLabel true 1\n@data\n1,2:1\n",
        "unlabelled.ts": "@classLabel false\n@data\n1,2\n",
        "label.ts": "@classLabel true 1\n@data\n1,2:7\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError):
            load_uea_ts(tmp_path / name)


# ---------------------------------------------------------------- images


def test_digits() -> None:
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test", flatten=True)
    assert tuple(train_x.shape) == (1347, 1, 8, 8) and tuple(test_x.shape) == (450, 64)
    assert len(train_x) + len(test_x) == 1797
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    for x in (train_x, test_x):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(load_digits("train", flatten=True)[0], train_x.reshape(1347, 64))
    counts = torch.bincount(torch.cat([train_y, test_y]))
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert torch.bincount(test_y).min() >= 43  # stratified
    arrays = np.load(ds.DATA_DIR / "digits.npz")
    index = np.concatenate([arrays["train_index"], arrays["test_index"]])
    assert sorted(index.tolist()) == list(range(1797))


def test_mnist_subset() -> None:
    train_x, train_y = load_mnist_subset("train")
    test_x, test_y = load_mnist_subset("test", flatten=True)
    assert tuple(train_x.shape) == (4000, 1, 28, 28) and tuple(test_x.shape) == (1000, 784)
    assert torch.bincount(train_y).tolist() == [400] * 10
    assert torch.bincount(test_y).tolist() == [100] * 10
    for x in (train_x, test_x):
        assert x.dtype == torch.float32
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # uint8 storage: every pixel is a multiple of 1/255
    pixels = train_x[:50] * 255
    assert torch.equal(pixels, pixels.round())
    arrays = np.load(ds.DATA_DIR / "mnist_5k.npz")
    assert arrays["images"].dtype == np.uint8
    index = np.concatenate([arrays["train_index"], arrays["test_index"]])
    assert sorted(index.tolist()) == list(range(5000))


# ---------------------------------------------------------------- diamonds


def test_diamonds() -> None:
    splits = {s: load_diamonds(s) for s in ("train", "val", "test")}
    assert {s: tuple(x.shape) for s, x in splits.items()} == {
        "train": (43152, 7),
        "val": (5394, 7),
        "test": (5394, 7),
    }
    assert sum(len(x) for x in splits.values()) == 53940
    train = splits["train"]
    assert train.dtype == torch.float32
    torch.testing.assert_close(train.mean(0), torch.zeros(7), atol=1e-4, rtol=0)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(7), atol=1e-4, rtol=0)
    raw = torch.cat([load_diamonds(s, log_transform=False, standardize=False) for s in splits])
    assert ds.DIAMONDS_COLUMNS == ("carat", "depth", "table", "price", "x", "y", "z")
    assert raw[:, 3].min() == 326 and raw[:, 3].max() == 18823
    torch.testing.assert_close(raw[:, 0].min(), torch.tensor(0.2))
    torch.testing.assert_close(raw[:, 0].max(), torch.tensor(5.01))
    logged = load_diamonds("val", standardize=False)
    plain = load_diamonds("val", log_transform=False, standardize=False)
    torch.testing.assert_close(logged[:, [0, 3]], plain[:, [0, 3]].log())
    torch.testing.assert_close(logged[:, [1, 2, 4, 5, 6]], plain[:, [1, 2, 4, 5, 6]])
    mean, std = ds.diamonds_statistics()
    torch.testing.assert_close(splits["val"] * std + mean, logged, atol=1e-3, rtol=1e-4)
    # the split is stored, not redrawn: same rows every call
    assert torch.equal(load_diamonds("test"), splits["test"])


# ------------------------------------------------------------------ control paths of the Neural CDE
@pytest.mark.parametrize("data", ["japanese_vowels", "basic_motions"])
def test_main_job_time_channel_never_runs_backwards(data):
    """The time channel's derivative is >= 0 everywhere, for series of every length of the data set
    (a spline built on padded series had -0.012 on JapaneseVowels: time ran backwards)."""
    torchcde = pytest.importorskip("torchcde")
    from snopt_dyn.compare.tasks.timeseries import _load_series_cde

    (ctr, _), (cte, _), info = _load_series_cde(data)
    grid = torch.linspace(0, info["length"] - 1, 40 * (info["length"] - 1) + 1)
    for coeffs in (ctr, cte):
        path = torchcde.CubicSpline(coeffs)
        slope = torch.stack([path.derivative(t)[:, 0] for t in grid])
        assert float(slope.min()) >= -1e-6, f"time channel derivative reaches {float(slope.min()):.4f}"


def test_main_job_and_estimators_share_one_spline_helper():
    """One helper for both: the estimators' coefficients of the same standardised series equal the main job's."""
    pytest.importorskip("torchcde")
    from snopt_dyn.compare.tasks.timeseries import _load_series_cde
    from snopt_dyn.estimators import preprocessing

    train = ds.load_japanese_vowels("train", standardize=True)
    (ctr, _), _, info = _load_series_cde("japanese_vowels")
    scaling = preprocessing.Scaling(mean=torch.zeros(train.num_channels), std=torch.ones(train.num_channels),
                                    time_span=float(info["length"] - 1), time_unit=1.0)
    ours = preprocessing.cde_coefficients(train, scaling)
    assert torch.allclose(ours, ctr[:, :ours.shape[1]], atol=1e-6)
    assert (ctr[:, ours.shape[1]:, -3 * ctr.shape[-1] // 4:] == 0).all()  # held constant after the end


def test_a_missing_torchcde_is_refused_naming_the_extra(monkeypatch):
    """Without torchcde, building a control path names what needs it and the pip extra that installs it."""
    monkeypatch.setitem(sys.modules, "torchcde", None)  # as if not installed
    with pytest.raises(ImportError, match=r"control path needs torchcde: pip install 'snopt-dyn\[torchcde\]'"):
        ds.hermite_coefficients(torch.zeros(2, 3, 1), torch.tensor([3, 3]))
