"""snopt-dyn: a second-order optimizer (SNOpt) for neural differential equations."""
from . import hooks
from .adjoint import NFECounter, nfe, odeint_adjoint
from .errors import NonFiniteError, SolverError
from .preconditioner import SNOpt
from .terminal_time import TerminalTimeOptimizer
from .wrapping import wrap

__all__ = ["odeint_adjoint", "wrap", "SNOpt", "NonFiniteError", "TerminalTimeOptimizer", "SolverError", "NFECounter", "nfe", "hooks"]
__version__ = "0.1.0"
