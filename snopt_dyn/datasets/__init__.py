"""Small real data sets vendored with the package, and their loaders.

Everything here loads from ``.npz`` files next to this module (see
``DATA.md`` for sources, licences, citations, splits and checksums) using only
``torch`` and ``numpy``; nothing is downloaded at run time.

* Time series (Neural CDE layout, :class:`TimeSeriesData`):
  :func:`load_japanese_vowels`, :func:`load_basic_motions`, and
  :func:`load_uea_ts` for user-supplied UEA ``.ts`` files; helpers
  :func:`drop_observations` (irregular protocol), :func:`with_time_channel`,
  :func:`channel_statistics`, :func:`standardize`; :func:`hermite_coefficients` (Neural CDE control
  paths built per series, held constant after each series' end; needs torchcde).
* Images: :func:`load_digits` (8x8), :func:`load_mnist_subset` (28x28).
* Tabular density: :func:`load_diamonds`.
"""

from ._io import DATA_DIR
from .images import load_digits, load_mnist_subset
from .splines import hermite_coefficients
from .tabular import DIAMONDS_COLUMNS, DIAMONDS_LOG_COLUMNS, diamonds_statistics, load_diamonds
from .timeseries import (
    TimeSeriesData,
    channel_statistics,
    drop_observations,
    from_sequences,
    standardize,
    with_time_channel,
)
from .uea import load_basic_motions, load_japanese_vowels, load_uea_ts, parse_ts, sort_class_labels

__all__ = [
    "DATA_DIR",
    "DIAMONDS_COLUMNS",
    "DIAMONDS_LOG_COLUMNS",
    "TimeSeriesData",
    "channel_statistics",
    "diamonds_statistics",
    "drop_observations",
    "from_sequences",
    "hermite_coefficients",
    "load_basic_motions",
    "load_diamonds",
    "load_digits",
    "load_japanese_vowels",
    "load_mnist_subset",
    "load_uea_ts",
    "parse_ts",
    "sort_class_labels",
    "standardize",
    "with_time_channel",
]
