"""The engine's exceptions, in one place so that every module can raise them without import cycles."""


class SolverError(RuntimeError):
    """The solver did not finish: too many field evaluations (a stiff or exploding problem)."""


class NonFiniteError(FloatingPointError):
    """Raised by :meth:`snopt_dyn.SNOpt.step` on NaN/Inf gradients or statistics when ``raise_on_nonfinite``."""
