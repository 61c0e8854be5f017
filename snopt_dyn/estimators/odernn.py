"""ODE-RNN estimator: :class:`snopt_dyn.models.ODERNN` (Rubanova et al. 2019) behind the scikit-learn
API, fed as the main job's ``latent`` task feeds it (values with NaN -> 0, mask, times)."""
from __future__ import annotations

from torch import Tensor, nn

from snopt_dyn.models import ODERNN
from . import preprocessing
from .cde import PARAMETERS
from .heads import SeriesClassifier

__all__ = ["ODERNNClassifier"]


class ODERNNClassifier(SeriesClassifier):
    __doc__ = """ODE-RNN time-series classifier trained with SNOpt.

    Between observations the hidden state follows an ODE (dopri5, one engine-adjoint solve per gap);
    a GRU cell reads each observed step (NaN steps are skipped via the mask); logits ``=
    Linear(h_final)``.  Gaps are in units of the fit data's median gap.  Suits irregular series;
    cost grows with the series length (one solve per time step).  SNOpt preconditions the Linear
    layers (field and head); the GRU cell is left to the base SGD (``snopt_options={"skip": ()}``
    brings back SNOpt's warning about it).
""" + PARAMETERS + """    ``classes_``: the labels, sorted.
"""

    #: the main job's latent-task learning rates
    _default_lrs = {"snopt": 0.03, "adam": 1e-2, "sgd": 1e-3}
    #: SNOpt preconditions Linear/Conv layers; the GRU cell is left to the base SGD (the main job gives it an Adam)
    _snopt_defaults = {"skip": (nn.GRUCell,)}

    def _encode(self, data, scaling: preprocessing.Scaling) -> Tensor:
        return preprocessing.odernn_inputs(data, scaling)

    def _build(self, channels: int, outputs: int) -> nn.Module:
        width = 32 if self.width is None else int(self.width)
        return ODERNN(channels, hidden=int(self.hidden), num_classes=outputs, width=width, method="dopri5",
                      rtol=self.rtol, atol=self.atol)

    def _forward(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x[..., :-2], x[..., -1], x[..., -2] > 0.5)
