"""The optimizers ``snopt-dyn compare`` knows, by name, and how each is built for a model."""
from __future__ import annotations

import math

import torch
from torch import nn

#: Optimizers ``compare`` knows; ``snopt`` is SNOpt preconditioning plain SGD (as in the paper).
OPTIMIZER_NAMES = ("snopt", "adam", "sgd", "sgd-plain")


#: The first-order baselines (used for the default target accuracy).
FIRST_ORDER = ("adam", "sgd", "sgd-plain")


OPTIMIZER_HELP = {
    "snopt": "SNOpt preconditioner on SGD without momentum (the paper's setting)",
    "adam": "torch.optim.Adam",
    "sgd": "SGD with momentum 0.9",
    "sgd-plain": "SGD without momentum",
}


def parse_optimizer(spec: str):
    """``"adam"`` → ``("adam", None)``; ``"adam@1e-3"`` → ``("adam", 0.001)``; raises ``ValueError``."""
    kind, sep, lr = spec.strip().lower().partition("@")
    if kind not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
    if not sep:
        return kind, None
    try:
        value = float(lr)
    except ValueError:
        raise ValueError(f"bad learning rate in {spec!r}; write NAME@LR, e.g. adam@1e-3") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"learning rates must be positive, got {spec!r}")
    return kind, value


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The base optimizer of run ``name`` (for ``snopt``: the SGD that SNOpt preconditions)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name in ("sgd-plain", "snopt"):
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
