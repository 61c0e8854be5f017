"""The result types of a comparison: one optimizer's :class:`Run` and a seed's :class:`CompareResult`.

A module of their own so that the runner (which fills them) and the summary, table and plot (which
read them) depend on it, and not on each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import snopt_dyn
from .tasks.base import Task

__all__ = ["Run", "CompareResult"]


@dataclass
class Run:
    """One optimizer's training run: model, optimizer, data order, clock and raw curve."""

    name: str           # the label: the optimizer's name, or "name@lr" in a learning-rate sweep
    kind: str           # one of OPTIMIZER_NAMES
    lr: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    precond: Optional[snopt_dyn.SNOpt]
    generator: torch.Generator
    batch_size: int
    n_train: int
    clock: float = 0.0
    iters: int = 0
    nfe_forward: int = 0
    nfe_backward: int = 0
    sampling_nfe: int = 0
    status: str = "ok"
    done: bool = False
    next_eval: float = 0.0
    rows: List[dict] = field(default_factory=list)
    lr_schedule: Optional[Callable[[float], float]] = None  # multiplier as a function of budget spent
    seed: int = 0
    _base_lrs: Dict[int, float] = field(default_factory=dict)
    _order: Optional[torch.Tensor] = None
    _pos: int = 0

    def next_batch(self) -> torch.Tensor:
        """Indices of the next batch: epochs of a seeded permutation, last partial batch dropped."""
        size = min(self.batch_size, self.n_train)
        if self._order is None or self._pos + size > len(self._order):
            self._order = torch.randperm(self.n_train, generator=self.generator)
            self._pos = 0
        index = self._order[self._pos:self._pos + size]
        self._pos += size
        return index

    @property
    def evals(self) -> List[dict]:
        return [r for r in self.rows if r["test_metric"] is not None]


@dataclass
class CompareResult:
    """Everything a comparison produced: its settings and the runs (with their raw curves)."""

    task: Task
    runs: List[Run]
    settings: Dict[str, object]
    wall_s: float = 0.0
    interrupted: bool = False
    notes: List[str] = field(default_factory=list)
