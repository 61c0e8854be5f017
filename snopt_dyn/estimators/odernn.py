"""ODE-RNN estimators: :class:`snopt_dyn.models.ODERNN` (Rubanova et al. 2019) behind the scikit-learn
API, fed as the main job's ``latent`` task feeds it (values with NaN -> 0, mask, times) and trained as
it trains it (SNOpt on the Linear layers, an Adam of its own for the GRU cell)."""
from __future__ import annotations

from torch import Tensor, nn

from snopt_dyn.models import ODERNN
from . import preprocessing
from .cde import PARAMETERS, SERIES_SNOPT
from .heads import SeriesClassifier, SeriesRegressor

__all__ = ["ODERNNClassifier", "ODERNNRegressor"]


class _ODERNN:
    """Inputs, model and optimizer settings of the ODE-RNN estimators."""

    #: the main job's latent-task learning rates (SNOpt's: the base SGD's under the Adam rule)
    _default_lrs = {"snopt": 1e-2, "adam": 1e-2, "sgd": 1e-3}
    #: the latent task's rule: Adam in the eigenbasis after 10 steps in the weights' own basis (the
    #: paper's rule lost 5-14 points to AdamW-cosine on data it was not tuned on, BENCHMARKS.md §6,
    #: tenth round); SNOpt preconditions the Linear layers (field and head); the GRU cell is not a
    #: layer kind it preconditions, so it is skipped (no warning) ...
    _snopt_defaults = {**SERIES_SNOPT, "skip": (nn.GRUCell,)}
    #: ... and gets an Adam of its own at the latent task's Adam rate, the main job's ``rest=adam``
    _snopt_rest = "adam"

    def _encode(self, data, scaling: preprocessing.Scaling) -> Tensor:
        return preprocessing.odernn_inputs(data, scaling)

    def _build(self, channels: int, outputs: int) -> nn.Module:
        width = 32 if self.width is None else int(self.width)
        return ODERNN(channels, hidden=int(self.hidden), num_classes=outputs, width=width, method="dopri5",
                      rtol=self.rtol, atol=self.atol)

    def _forward(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x[..., :-2], x[..., -1], x[..., -2] > 0.5)


_MODEL = """
    Between observations the hidden state follows an ODE (dopri5, one engine-adjoint solve per gap);
    a GRU cell reads each observed step (NaN steps are skipped via the mask); the output is
    ``Linear(h_final)``.  Gaps are in units of the fit data's median gap.  Suits irregular series;
    cost grows with the series length (one solve per time step).

    Optimizer (``optimizer="snopt"``), as the main job's ``latent`` task trains this model: SNOpt
    preconditions the Linear layers (field and head) with Adam in its eigenbasis (after 10 steps of
    Adam in the weights' own basis), which the base SGD applies at ``lr`` (default 1e-2); the GRU
    cell, which SNOpt does not precondition (its ``unpreconditioned_parameters()``), gets an Adam of its own at the task's Adam rate 1e-2 (the
    main job's ``rest=adam``; both rates constant here, where the main job also decays them by a
    cosine).  ``snopt_options={"rest_lr": 3e-3}`` changes the Adam's rate, ``{"rest": "sgd"}`` puts
    the GRU cell on the base SGD (the paper's setting).
"""


class ODERNNClassifier(_ODERNN, SeriesClassifier):
    __doc__ = """ODE-RNN time-series classifier (Rubanova et al. 2019) trained with SNOpt; the output are logits.
""" + _MODEL + PARAMETERS + """    ``classes_``: the labels, sorted.
"""


class ODERNNRegressor(_ODERNN, SeriesRegressor):
    __doc__ = """ODE-RNN time-series regressor: as :class:`ODERNNClassifier`, with a linear read-out of
    ``y`` (``(n,)`` or ``(n, k)``, standardised on the fit targets) and squared error.
""" + _MODEL + PARAMETERS + """    ``n_outputs_``, ``target_scaling_`` (mean, std of the fit targets).
"""
