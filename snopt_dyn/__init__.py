"""snopt-dyn: a second-order optimizer (SNOpt) for neural differential equations.

The engine's public API: :func:`wrap` (one call for torchdyn / torchcde / torchdiffeq models),
:class:`SNOpt` (one line, ``precond.step()``), :func:`odeint_adjoint` (a drop-in for torchdiffeq's),
:func:`sdeint_adjoint` (a drop-in for torchsde's; it imports torchsde only when called),
:class:`TerminalTimeOptimizer` (the horizon T), and the errors.  Integrations that import optional
libraries (``snopt_dyn.lightning``, ``snopt_dyn.estimators``) and the main job (``snopt_dyn.compare``)
are imported on their own, never from here.
"""
from . import hooks
from .adjoint import NFECounter, nfe, odeint_adjoint
from .errors import NonFiniteError, SolverError
from .interception import no_interception
from .per_sample import per_sample_norm
from .preconditioner import SNOpt
from .sde_adjoint import sdeint_adjoint
from .terminal_time import TerminalTimeOptimizer
from .wrapping import restore_originals, wrap

__all__ = ["odeint_adjoint", "sdeint_adjoint", "wrap", "no_interception", "restore_originals", "SNOpt",
           "NonFiniteError", "per_sample_norm", "TerminalTimeOptimizer", "SolverError", "NFECounter", "nfe", "hooks"]
__version__ = "0.2.0"
