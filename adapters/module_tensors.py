"""What a routed back-propagation call differentiates: a module's tensors, and walks of their graph.

A wrapped model's plain ``odeint``/``sdeint`` (back-propagation through the solver in the user's
code) runs on the engine's adjoint, which needs the tensors to differentiate.  They are the module's
parameters, buffers and tensor attributes that require grad (a context ``self.ctx = self.encoder(x)``
set before the solve), less any of them computed from others: listed beside the tensors it was
computed from, such a tensor would pass their gradient twice, once from the engine and once back
through its own history.  Left out, its history is differentiated through the field instead.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Tuple

from torch import Tensor, nn


def module_tensors(func: nn.Module) -> Tuple[Tensor, ...]:
    """Parameters, buffers and tensor attributes of ``func`` (and its submodules) requiring grad,
    less those computed from others of them: what the engine differentiates."""
    found: List[Tensor] = []
    seen = set()
    for x in [*func.parameters(), *func.buffers(), *(v for m in func.modules() for v in vars(m).values())]:
        if isinstance(x, Tensor) and x.requires_grad and id(x) not in seen:
            seen.add(id(x))
            found.append(x)
    leaves, nodes = _listed(found)
    return tuple(t for t in found if t.grad_fn is None or not _history_reaches(t, leaves, nodes))


def reaches_unlisted(outputs: Iterable, tensors) -> bool:
    """Whether autograd's graph of ``outputs`` reaches a leaf requiring grad that is not in ``tensors``
    (a listed tensor with a history of its own stops the walk: its gradient flows on by itself)."""
    leaves, stops = _listed(tensors)
    roots = []
    for out in outputs:
        if isinstance(out, Tensor) and out.requires_grad:
            if out.grad_fn is None and id(out) not in leaves:
                return True
            roots.append(out.grad_fn)
    return any(id(leaf) not in leaves for leaf in map(_leaf, _ancestors(roots, stops)) if leaf is not None)


def _history_reaches(tensor: Tensor, leaves: set, nodes: set) -> bool:
    """Whether the graph above ``tensor``'s own node has a node of ``nodes`` or a leaf in ``leaves``."""
    for node in _ancestors(nxt for nxt, _ in tensor.grad_fn.next_functions):
        leaf = _leaf(node)
        if node in nodes or (leaf is not None and id(leaf) in leaves):
            return True
    return False


def _listed(tensors) -> Tuple[set, set]:
    """The ids of the leaves among ``tensors``, and the autograd nodes of the others."""
    return {id(t) for t in tensors if t.grad_fn is None}, {t.grad_fn for t in tensors if t.grad_fn is not None}


def _ancestors(roots: Iterable, stops: set = frozenset()) -> Iterator[Any]:
    """Every autograd node at or above ``roots``, once each, not walking into ``stops``."""
    stack, seen = list(roots), set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions)


def _leaf(node) -> Any:
    """The tensor of an ``AccumulateGrad`` node (a leaf requiring grad), else None."""
    return getattr(node, "variable", None)
