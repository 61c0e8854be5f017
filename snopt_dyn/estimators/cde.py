"""Neural CDE estimators: torchcde's canonical model (:class:`snopt_dyn.models.NeuralCDE`) behind the
scikit-learn API, trained with SNOpt by default."""
from __future__ import annotations

from torch import Tensor, nn

from snopt_dyn.models import NeuralCDE
from . import preprocessing
from .heads import SeriesClassifier, SeriesRegressor

__all__ = ["NeuralCDEClassifier", "NeuralCDERegressor", "PARAMETERS"]

PARAMETERS = """
    Parameters (stored by the constructor, used by ``fit``):
        hidden: size of the hidden state z.
        width: hidden width of the vector field's MLP (None: 64 for the Neural CDE, 32 for the ODE-RNN).
        optimizer: ``"snopt"`` (SNOpt, whose preconditioned update the base SGD applies), ``"adam"``
            or ``"sgd"`` (momentum 0.9).
        lr: learning rate (for ``"snopt"``: the base SGD's); None: the main job's tuned value.
        schedule: ``"constant"``, or ``"cosine"``: every rate warms up linearly over the first 5 % of
            the budget, then decays to 0 by a cosine (:func:`snopt_dyn.schedules.warmup_cosine`); the
            budget is ``max_epochs`` or ``max_time``, whichever runs out first.  A warm-started ``fit``
            runs the schedule anew over its own budget.
        snopt_options: keyword arguments for :class:`snopt_dyn.SNOpt`, over the defaults
            ``damping=0.05, sample_step=1.0`` and the model's: the Neural CDE takes the main job's
            ``timeseries`` settings (``rule="adam", power=0.5, update_freq=20``: Adam in the
            eigenbasis, at ``lr=1e-2``, after 10 steps of Adam in the weights' own basis:
            ``first_basis=10, first_moments="restart"``), the ODE-RNN its ``latent`` settings (the same since
            the tenth round); and, as in the main job, ``rest``
            (``"sgd"`` or ``"adam"``: an Adam of their own for the parameters SNOpt does not
            precondition) and ``rest_lr`` (its rate).
        batch_size, max_epochs: minibatch size and the most epochs.
        max_time: training budget in seconds (steps and validation passes; checked after every step,
            so ``fit`` may overrun by one step and one validation pass); None: no budget.
        early_stopping, validation_fraction, n_iter_no_change, tol: hold out ``validation_fraction`` of
            the fit series (stratified for classifiers), stop after ``n_iter_no_change`` epochs without
            the validation loss improving by ``tol``, keep the weights of the best validation loss.
        rtol, atol: tolerances of the dopri5 solves in training (forward and adjoint).
        predict_tol: rtol and atol of the solves that predict (``predict``, ``predict_proba``,
            ``score``, the validation loss), with per-sample error control (each series meets the
            tolerance on its own, :func:`snopt_dyn.per_sample_norm`).  A batch's series share the
            adaptive steps, so a prediction moves with its batch mates by about the global error: on
            JapaneseVowels, predicted alone, with 9 or with 99 others, probabilities moved by up to
            0.11 (and labels flipped) at 1e-3 with torchdiffeq's one norm over the batch, and by
            1.3e-3 at the default 1e-5 with per-sample control (``tests/test_batch_independence.py``
            asserts 5e-3).  None: ``rtol``/``atol`` (faster, batch-dependent).
        warm_start: a second ``fit`` continues from the fitted weights and preprocessing, and from
            the optimizer's and SNOpt's state and the batch order: ``fit`` for k epochs and then k more
            equals one ``fit`` of 2k (no early stopping, same int ``random_state``); see
            :mod:`snopt_dyn.estimators.base` for what a change of data or ``random_state`` does.
        random_state: seed (int), ``RandomState`` or None; fixes initialisation, split and batch order.
        device: torch device for training and prediction (``"cpu"``, ``"cuda"``, ...).
        verbose: 0 silences the tqdm progress bar (one bar over epochs); 2 keeps it after ``fit``.

    Fitted attributes: ``model_`` (the wrapped torch module), ``scaling_`` (preprocessing statistics),
    ``n_features_in_`` (channels), ``n_iter_`` (epochs), ``n_steps_`` (these two summed over
    warm-started fits; the rest are the last fit's), ``loss_curve_``, ``validation_loss_curve_``,
    ``best_validation_loss_``, ``stopped_by_`` (``"max_epochs"``, ``"early_stopping"`` or
    ``"max_time"``), ``fit_time_`` (seconds), ``device_``, ``history_``.
"""


#: the main job's SNOpt settings on both series tasks (timeseries and latent), less ``sample_step``,
#: which :data:`training.SNOPT_DEFAULTS` already sets; ``tests/test_estimators_parity.py`` ties them
SERIES_SNOPT = {"rule": "adam", "power": 0.5, "update_freq": 20, "first_basis": 10, "first_moments": "restart"}


class _CDE:
    """Inputs, model and optimizer settings of the Neural CDE estimators."""

    #: the main job's timeseries-task learning rates (SNOpt's: the base SGD's under the Adam rule)
    _default_lrs = {"snopt": 1e-2, "adam": 3e-3, "sgd": 0.01}
    #: the timeseries task's rule: Adam in the eigenbasis, not the paper's rule, which is not
    #: scale-free and lost by 12-18 points on data sets it was not tuned on (BENCHMARKS.md §6, "The scikit-learn estimators")
    _snopt_defaults = SERIES_SNOPT

    def _encode(self, data, scaling: preprocessing.Scaling) -> Tensor:
        return preprocessing.cde_coefficients(data, scaling)

    def _build(self, channels: int, outputs: int) -> nn.Module:
        width = 64 if self.width is None else int(self.width)
        return NeuralCDE(channels + 1, int(self.hidden), outputs, width=width, rtol=self.rtol, atol=self.atol)


class NeuralCDEClassifier(_CDE, SeriesClassifier):
    __doc__ = """Neural CDE time-series classifier (Kidger et al. 2020) trained with SNOpt.

    Standardised series plus a time channel -> Hermite cubic spline X; ``z0 = Linear(X(t0))``,
    ``dz = f(z) dX`` solved with dopri5 on the engine adjoint; logits ``= Linear(z(T))``.  Inputs:
    see :mod:`snopt_dyn.estimators.inputs` (3-D arrays, variable-length lists, NaN, ``times=``).
""" + PARAMETERS + """    ``classes_``: the labels, sorted.
"""


class NeuralCDERegressor(_CDE, SeriesRegressor):
    __doc__ = """Neural CDE time-series regressor: as :class:`NeuralCDEClassifier`, with a linear
    read-out of ``y`` (``(n,)`` or ``(n, k)``, standardised on the fit targets) and squared error.
""" + PARAMETERS + """    ``n_outputs_``, ``target_scaling_`` (mean, std of the fit targets).
"""
