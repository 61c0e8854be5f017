"""Helpers shared by the SDE tests (not a test module)."""
from __future__ import annotations

import torch


def engine_used(loss: torch.Tensor) -> bool:
    """Whether the engine's SDE solve is in ``loss``'s graph."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_SDEAdjointSolveBackward":
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False
