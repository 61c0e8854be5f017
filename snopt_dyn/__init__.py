"""snopt-dyn: a second-order optimizer (SNOpt) for neural differential equations."""
from . import hooks
from .adjoint import NFECounter, SolverError, nfe, odeint_adjoint
from .preconditioner import NonFiniteError, SNOpt
from .terminal_time import TerminalTimeOptimizer
from .wrapping import wrap

__all__ = ["odeint_adjoint", "wrap", "SNOpt", "NonFiniteError", "TerminalTimeOptimizer", "SolverError", "NFECounter", "nfe", "hooks"]
__version__ = "0.1.0"
