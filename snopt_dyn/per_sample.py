"""Per-sample error control: every sample of a batched adaptive solve meets the tolerance on its own.

torchdiffeq's default error norm is one RMS over the whole state, so in a batch of B series a
hard series' local error is diluted by the easy ones (up to ``sqrt(B)``), and the steps -- with
them every series' output -- depend on which other series share the batch.  The per-sample norm
takes the RMS of each sample's own part of the state and the maximum over samples: each sample's
local error stays within ``atol + rtol |y|``, so its solution is within the tolerance of the exact
one whatever its companions are.  The solver's steps are still shared (a sample's output can still
move by an amount of the order of the tolerance), but no longer by ``sqrt(B)`` times more.

Convention: dim 0 of every part of the state is the batch (torchdyn, torchcde and torchdiffeq
models all batch that way); a 1-D part counts each entry as a sample (a max-abs norm), a 0-dim
part is one number.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["per_sample_norm", "per_sample_rms", "MODES", "check_mode", "is_evaluation"]

#: what ``wrap(per_sample_error=...)`` accepts: always, never, or for solves without a gradient /
#: in eval mode (predictions)
MODES = (True, False, "eval")


def per_sample_rms(x: Tensor) -> Tensor:
    """``max_b rms(x[b])`` for a batch-first tensor (``|x|`` for a 0-dim one); no host sync."""
    if x.dim() == 0:
        return x.abs()
    if x.numel() == 0:
        return x.new_zeros(())
    return x.reshape(x.shape[0], -1).pow(2).mean(dim=1).sqrt().max()


def per_sample_norm(state: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """The per-sample error norm, for ``options={"norm": per_sample_norm}`` of ``torchdiffeq.odeint``,
    ``torchdiffeq.odeint_adjoint`` (whose default adjoint norm then applies it to ``y`` and ``a``
    too) and :func:`snopt_dyn.odeint_adjoint`.

    For a tensor state: the largest per-sample RMS (dim 0 is the batch).  For a tuple state: the
    largest over its parts, i.e. every sample's own torchdiffeq norm (max over parts of the RMS),
    maximised over samples.
    """
    if isinstance(state, Tensor):
        return per_sample_rms(state)
    norms = [per_sample_rms(part) for part in state]
    return torch.stack(norms).max() if len(norms) > 1 else norms[0]


def check_mode(value) -> Union[bool, str]:
    """``value`` if it is a valid ``per_sample_error`` setting, else a ``ValueError`` naming them."""
    if isinstance(value, bool) or value == "eval":
        return value
    raise ValueError(f"per_sample_error must be True, False or 'eval' (per-sample error control only for "
                     f"solves without a gradient or in eval mode), got {value!r}")


def is_evaluation(modules: Tuple[torch.nn.Module, ...]) -> bool:
    """A solve counts as an evaluation when autograd records nothing or the model is in eval mode."""
    return not torch.is_grad_enabled() or any(not m.training for m in modules)
