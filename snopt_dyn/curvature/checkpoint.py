"""``SNOpt.state_dict`` / ``load_state_dict``: per layer by module name, checked, cast on load.

Like torch optimizers' ``load_state_dict``, tensors follow the parameters: they are moved to the
layer's device and cast to its statistics dtype (at least float32), so a checkpoint saved on GPU or
in float64 loads onto a CPU or float32 model.  Names and shapes must match; the error says which.
"""
from __future__ import annotations

from typing import Dict, List

from .statistics import stat_dtype

_TENSORS = ("u_a", "u_g", "m2", "m1", "a", "g")
#: per-layer numbers, with the value a checkpoint written before they existed implies
_NUMBERS = {"batch": 1, "mult": 1, "role": "unknown", "samples": 0, "t": 0, "weight": 0.0}


def layer_shapes(st) -> Dict[str, tuple]:
    """The shapes a layer's saved tensors must have: ``(d_in, d_in)``, ``(d_out, d_out)``, ``(d_out, d_in)``."""
    w = st.module.weight
    d_out, d_in = w.shape[0], w[0].numel() + (st.module.bias is not None)
    return {"u_a": (d_in, d_in), "u_g": (d_out, d_out), "m2": (d_out, d_in), "m1": (d_out, d_in),
            "a": (d_in, d_in), "g": (d_out, d_out)}


def save(layers: List, counters: dict) -> dict:
    saved = {st.name: {**{k: getattr(st, k) for k in _TENSORS}, **{k: getattr(st, k) for k in _NUMBERS}}
             for st in layers}
    return {**counters, "layers": saved}


def check(layers: List, state: dict) -> None:
    """Raise ``ValueError`` naming every mismatch between ``state`` and the model's layers."""
    if not isinstance(state, dict) or "layers" not in state or "steps" not in state:
        raise ValueError("not an SNOpt state_dict (expected the keys 'steps', 'refreshes', 'layers')")
    by_name = {st.name: st for st in layers}
    unknown = sorted(set(state["layers"]) - set(by_name))
    missing = sorted(set(by_name) - set(state["layers"]))
    problems = []
    if unknown:
        problems.append(f"layers this model lacks: {unknown}")
    if missing:
        problems.append(f"layers of this model the state_dict lacks: {missing}")
    for name, saved in state["layers"].items():
        if name not in by_name:
            continue
        for key, shape in layer_shapes(by_name[name]).items():
            t = saved.get(key)
            if t is not None and tuple(t.shape) != shape:
                problems.append(f"{name}.{key} has shape {tuple(t.shape)}, the layer needs {shape}")
    if problems:
        raise ValueError("SNOpt.load_state_dict: the state_dict does not fit this model: " + "; ".join(problems)
                         + ". Build SNOpt with the same model (and skip=) as the one that saved it.")


def load(layers: List, state: dict) -> None:
    """Copy ``state`` into the layers (after :func:`check`), on each layer's device and dtype."""
    by_name = {st.name: st for st in layers}
    for name, saved in state["layers"].items():
        st = by_name[name]
        w = st.module.weight
        for key in _TENSORS:
            t = saved.get(key)
            setattr(st, key, None if t is None else t.detach().to(w.device, stat_dtype(w.dtype)).clone())
        for key, default in _NUMBERS.items():
            setattr(st, key, saved.get(key, default))
