"""PyTorch Lightning integration: :class:`SNOptCallback` (optional; the engine never imports this module).

::

    model = Learner(field=snopt_dyn.wrap(field))          # any LightningModule with wrapped parts
    trainer = pl.Trainer(callbacks=[SNOptCallback(update_freq=50, damping=0.05)])
    trainer.fit(model, loader)                             # checkpoints carry SNOpt's state

The callback builds :class:`snopt_dyn.SNOpt` on the LightningModule when fitting starts,
preconditions the gradients in ``on_before_optimizer_step`` (after ``backward`` and gradient
accumulation, before gradient clipping and ``optimizer.step()``), steps a
:class:`snopt_dyn.TerminalTimeOptimizer` when asked to
(``terminal_time={...}``) at the end of each batch whose optimizer step ran, logs SNOpt's counters through the trainer's logger, and saves and
restores both states in Lightning checkpoints, so a resumed run continues exactly like an
uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

try:
    import pytorch_lightning as pl
except ImportError:  # the unified ``lightning`` package
    import lightning.pytorch as pl  # type: ignore[no-redef]

from .preconditioner import SNOpt
from .terminal_time import TerminalTimeOptimizer

__all__ = ["SNOptCallback"]


class SNOptCallback(pl.Callback):
    """SNOpt (and optionally a trainable horizon) inside a Lightning ``Trainer``.

    Args:
        terminal_time: keyword arguments of :class:`snopt_dyn.TerminalTimeOptimizer` (e.g.
            ``{"lr": 0.1, "reg": 1e-3}``) to train the horizons of a model wrapped with
            ``train_terminal_time=True``; ``None`` leaves horizons alone.
        log: log ``snopt/steps``, ``snopt/refreshes``, ``snopt/step_time`` and
            ``snopt/sampling_nfe`` (and ``snopt/T/<module>`` per horizon) on every optimizer step.
        **snopt_kwargs: passed to :class:`snopt_dyn.SNOpt` (``damping``, ``update_freq``, ...).
    """

    def __init__(self, *, terminal_time: Optional[Dict[str, Any]] = None, log: bool = True, **snopt_kwargs: Any):
        super().__init__()
        self.snopt_kwargs = snopt_kwargs
        self.terminal_time_kwargs = terminal_time
        self.log_diagnostics = log
        self.precond: Optional[SNOpt] = None
        self.horizon: Optional[TerminalTimeOptimizer] = None
        self._pending: Optional[dict] = None
        self._stepped = False

    # ------------------------------------------------------------------------------ life cycle
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Build SNOpt (and the horizon optimizer) on the module; apply a checkpoint's state."""
        if self.precond is None:
            self.precond = SNOpt(pl_module, **self.snopt_kwargs)
            if self.terminal_time_kwargs is not None:
                self.horizon = TerminalTimeOptimizer(pl_module, **self.terminal_time_kwargs)
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Detach the hooks, so that the module can be used (or fitted again) without SNOpt."""
        if stage == "fit" and self.precond is not None:
            self._pending = self.state_dict()
            self.precond.remove()
            if self.horizon is not None:
                self.horizon.remove()
            self.precond = self.horizon = None

    # ------------------------------------------------------------------------------ training
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        if self.precond is None:
            raise RuntimeError("SNOptCallback: on_before_optimizer_step ran before on_fit_start; the callback "
                               "only supports Trainer.fit")
        self.precond.step()
        self._stepped = True
        if self.log_diagnostics:
            d = self.precond.diagnostics()
            pl_module.log_dict({"snopt/steps": float(d["steps"]), "snopt/refreshes": float(d["refreshes"]),
                                "snopt/step_time": float(d["step_time"]),
                                "snopt/sampling_nfe": float(d["sampling_nfe"])}, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx: int) -> None:
        """After the batch whose optimizer step ran (Lightning has no hook right after
        ``optimizer.step()``; ``on_before_zero_grad`` runs before the *next* backward)."""
        if self.horizon is None or not self._stepped:
            return
        self._stepped = False
        self.horizon.step()
        if self.log_diagnostics:
            pl_module.log_dict({f"snopt/T/{name or 'model'}": float(T) for name, T in self.horizon.horizons.items()},
                               on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        if self.precond is None:
            return dict(self._pending or {})
        return {"snopt": self.precond.state_dict(),
                "terminal_time": None if self.horizon is None else self.horizon.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Lightning restores callbacks before ``on_fit_start``: keep the state until SNOpt exists."""
        if self.precond is None:
            self._pending = dict(state_dict)
        else:
            self._apply(state_dict)

    def _apply(self, state: Dict[str, Any]) -> None:
        if state.get("snopt") is not None:
            self.precond.load_state_dict(state["snopt"])
        if state.get("terminal_time") is not None:
            if self.horizon is None:
                raise ValueError("SNOptCallback: the checkpoint holds a TerminalTimeOptimizer state but this "
                                 "callback was made without terminal_time={...}; pass the same arguments as "
                                 "the run that saved it")
            self.horizon.load_state_dict(state["terminal_time"])
