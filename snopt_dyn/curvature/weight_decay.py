"""Decoupled weight decay, for every update rule.

SNOpt writes ``update + wd · W`` into ``.grad``, and the base optimizer (plain SGD at rate ``lr``)
then takes ``W ← W - lr · update - lr · wd · W``: AdamW's decoupled decay (Loshchilov & Hutter 2019),
the shrinkage never passing through the preconditioner, at the base optimizer's rate (so a schedule
scales both).  No learning rate has to be read for it.  Why: on small training sets SNOpt reached
the lowest training loss and a lower test plateau than AdamW-cosine (issue 20's held-out
diagnostic), and SOAP ships a decoupled 0.01.

It applies to every parameter of the layers SNOpt registers (weights and biases, as AdamW does
with the parameters it is given), after the optional KL clip, and not to
``SNOpt.unpreconditioned_parameters()`` (give their optimizer its own ``weight_decay``).
"""
from __future__ import annotations

from typing import Iterable

import torch


def apply(params: Iterable[torch.nn.Parameter], wd: float) -> None:
    """``p.grad += wd · p`` for every parameter with a gradient (no-op for ``wd = 0``)."""
    if wd == 0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.add_(p.detach(), alpha=wd)
