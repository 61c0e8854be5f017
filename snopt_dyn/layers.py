"""Per-layer-kind helpers: the rows that build the Kronecker factors, and the gradient as a matrix.

For a layer ``y = W x + b`` the per-row gradient of ``W`` is ``g x̄ᵀ`` with ``x̄ = [x; 1]``.  A Linear
layer applied to ``(n, ..., d_in)`` has one row per leading index; a convolution has one row per
output location, with ``x`` the im2col patch (Grosse & Martens 2016).

Rows come back as ``(n, L, d)``: ``n`` the layer call's leading (batch) dimension and ``L`` the
rows ("locations") per leading index.  Unbatched calls -- a ``(d,)`` input of a Linear, a
``(C, H, W)`` input of a Conv2d, a ``(C, L)`` input of a Conv1d, as torch itself accepts them --
are a batch of one (``n = 1``), so they give the same rows as ``(1, d)`` / ``(1, C, H, W)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerKind:
    """Shapes and reshapes for one supported module type."""

    #: the dimension of an unbatched call's input (torch's convention for this module type)
    unbatched_dim = 1

    def batched(self, t: Tensor) -> Tensor:
        """``t`` (a layer input or output gradient) with a leading batch dimension."""
        return t.unsqueeze(0) if t.dim() == self.unbatched_dim else t

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """``(n, L, d_in [+1])`` rows of the layer input, with a ones column when there is a bias."""
        raise NotImplementedError

    def output_rows(self, module: nn.Module, g: Tensor) -> Tensor:
        """``(n, L, d_out)`` rows of the output gradient, in the same row order as :meth:`input_rows`."""
        raise NotImplementedError

    def grad_matrix(self, module: nn.Module) -> Optional[Tensor]:
        """``[∇W | ∇b]`` as ``(d_out, d_in [+1])``, or ``None`` when the weight has no gradient."""
        w = module.weight
        if w.grad is None:
            return None
        mat = w.grad.reshape(w.shape[0], -1)
        if module.bias is not None:
            b = module.bias.grad if module.bias.grad is not None else torch.zeros_like(module.bias)
            mat = torch.cat([mat, b.reshape(-1, 1).to(mat.dtype)], dim=1)
        return mat

    def set_grad(self, module: nn.Module, mat: Tensor) -> None:
        """Write ``mat`` (any float dtype) back into ``.grad`` in the gradient's own dtype."""
        w = module.weight
        if module.bias is not None:
            w.grad.copy_(mat[:, :-1].reshape(w.shape))
            if module.bias.grad is not None:
                module.bias.grad.copy_(mat[:, -1])
        else:
            w.grad.copy_(mat.reshape(w.shape))


def _with_ones(rows: Tensor, bias: bool) -> Tensor:
    if not bias:
        return rows
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)


class LinearKind(LayerKind):
    unbatched_dim = 1

    def input_rows(self, module, x):
        x = self.batched(x)
        return _with_ones(x.reshape(x.shape[0], -1, x.shape[-1]), module.bias is not None)

    def output_rows(self, module, g):
        g = self.batched(g)
        return g.reshape(g.shape[0], -1, g.shape[-1])


class Conv2dKind(LayerKind):
    unbatched_dim = 3

    def _padding(self, module) -> tuple:
        padding = module.padding
        if isinstance(padding, str):  # 'valid' or 'same' with a symmetric pad (checked in kind_of())
            padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                            for d, k in zip(module.dilation, module.kernel_size))
        return padding

    def _patches(self, module, x: Tensor) -> Tensor:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=self._padding(module),
                        stride=module.stride)
        return cols.transpose(1, 2)  # (n, L, C*kh*kw)

    def input_rows(self, module, x):
        return _with_ones(self._patches(module, self.batched(x)), module.bias is not None)

    def output_rows(self, module, g):
        g = self.batched(g)
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)  # (n, H*W, C)


class Conv1dKind(Conv2dKind):
    unbatched_dim = 2

    def _patches(self, module, x):
        padding = module.padding
        if isinstance(padding, str):
            padding = (0 if padding == "valid" else module.dilation[0] * (module.kernel_size[0] - 1) // 2,)
        cols = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, padding[0]), stride=(1, module.stride[0]))
        return cols.transpose(1, 2)


def kind_of(module: nn.Module) -> Tuple[Optional[LayerKind], str]:
    """The helper for ``module``, or ``(None, reason)`` when it is not supported."""
    if type(module) is nn.Linear or isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return LinearKind(), ""
    for cls, kind in ((nn.Conv2d, Conv2dKind), (nn.Conv1d, Conv1dKind)):
        if isinstance(module, cls):
            if type(module).forward is not cls.forward:
                return None, f"{type(module).__name__} overrides forward"
            if module.groups != 1:
                return None, "grouped convolution"
            if module.padding_mode != "zeros":
                return None, f"padding_mode={module.padding_mode!r}"
            if module.padding == "same" and any((d * (k - 1)) % 2 for d, k in zip(module.dilation, module.kernel_size)):
                return None, "padding='same' with an even kernel"
            return kind(), ""
    return None, f"{type(module).__name__} is not Linear/Conv1d/Conv2d"
