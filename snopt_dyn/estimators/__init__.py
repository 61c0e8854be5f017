"""scikit-learn-compatible time-series estimators trained with SNOpt (needs ``pip install 'snopt-dyn[sklearn]'``).

* :class:`NeuralCDEClassifier`, :class:`NeuralCDERegressor`: torchcde's canonical Neural CDE;
* :class:`ODERNNClassifier`, :class:`ODERNNRegressor`: the ODE-RNN of Rubanova et al. (2019).

They follow the estimator contract (``fit``/``predict``/``predict_proba``/``score``, ``get_params``,
``clone``, ``Pipeline``, ``GridSearchCV``, ``cross_val_score``) on series: ``(n, length, channels)``
arrays, ``(n, length)`` univariate arrays, lists of variable-length ``(L_i, channels)`` arrays, NaN for
missing observations and optional ``times=`` (see :mod:`snopt_dyn.estimators.inputs`).
This subpackage is the only place of snopt-dyn that imports scikit-learn.
"""
try:
    import sklearn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("snopt_dyn.estimators needs scikit-learn: pip install 'snopt-dyn[sklearn]'") from exc

from .cde import NeuralCDEClassifier, NeuralCDERegressor
from .odernn import ODERNNClassifier, ODERNNRegressor

__all__ = ["NeuralCDEClassifier", "NeuralCDERegressor", "ODERNNClassifier", "ODERNNRegressor"]
