"""Training script for ``tests/test_lightning_ddp.py``: ``SNOptCallback`` in a real ``pl.Trainer``.

Lightning's ``strategy="ddp"`` re-launches *this script* (same ``sys.argv``) for ranks > 0, which
cannot work from inside pytest, so the test runs it with ``subprocess``.  No ``test_`` prefix: pytest
does not collect it.  The test also imports it to run the single-process reference in-process
(registered in ``sys.modules``: ``wrap`` rebinds the torchdiffeq names a model's module calls).

    python tests/lightning_ddp_worker.py OUT TAG --devices 2 --epochs 2 [--save-checkpoints DIR]
                                                 [--resume CKPT] [--no-factor-all-reduce]

Every rank writes ``OUT/TAG-rank{r}.pt``: its parameters (float64), and per optimizer step whether
SNOpt refreshed and how many ``torch.distributed`` collectives were called from SNOpt's code
(``snopt_dyn`` frames on the call stack; DDP's gradient bucket all-reduce runs in C++ and is not
seen, Lightning's own collectives have no ``snopt_dyn`` frame).  ``--no-factor-all-reduce`` replaces
SNOpt's all-reduce (``snopt_dyn.curvature.distributed._all_reduce``) by the identity, so that every
rank keeps its local factors: the test uses it to show that its checks can fail.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn
from torchdiffeq import odeint_adjoint

import snopt_dyn

try:
    import pytorch_lightning as pl
except ImportError:  # the unified ``lightning`` package
    import lightning.pytorch as pl  # type: ignore[no-redef]

from snopt_dyn.lightning import SNOptCallback

DT = torch.float64
#: 32 samples, 8 per optimizer step (4 per rank on 2 ranks): 4 steps per epoch
SAMPLES, GLOBAL_BATCH = 32, 8
#: refreshes at steps 0, 3, 6 of 8; the epoch-1 checkpoint (after step 3) is resumed through 4..7
SNOPT = dict(update_freq=3, damping=0.05, num_samples=4, moment="paper")
#: tight solves: the adaptive steps of a batch of 8 and of two batches of 4 differ within this tolerance
TOL = 1e-10
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
                "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
                "all_to_all_single", "gather", "scatter", "barrier")
_PACKAGE = os.path.dirname(os.path.abspath(snopt_dyn.__file__))


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, t, y):
        return self.net(y)


class Flow(nn.Module):
    def __init__(self):
        super().__init__()
        self.field = Field()

    def forward(self, x):
        return odeint_adjoint(self.field, x, torch.tensor([0.0, 1.0], dtype=x.dtype), rtol=TOL, atol=TOL)[-1]


class Learner(pl.LightningModule):
    """A wrapped torchdiffeq Neural ODE and a linear head, float64, plain SGD (with momentum)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ode = Flow().to(DT)
        snopt_dyn.wrap(self.ode)
        self.head = nn.Linear(2, 3).to(DT)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.ode(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def loader(devices: int) -> torch.utils.data.DataLoader:
    """Batches of ``GLOBAL_BATCH / devices``.  Under ddp, Lightning puts in a
    ``DistributedSampler(shuffle=True, seed=0)`` (it always shuffles training data, with
    ``set_epoch``): in step k rank r gets ``perm[8k + r], perm[8k + r + 2], ...``, so the two ranks
    together hold ``perm[8k:8k+8]``.  On one device the same sampler with ``num_replicas=1`` replays
    that permutation (Lightning calls its ``set_epoch`` too): the doubled batch of every step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 2, dtype=DT, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    sampler = None if devices > 1 else \
        torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    return torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH // devices, sampler=sampler)


class Counter:
    """Wraps ``torch.distributed``'s collectives: counts the calls made from ``snopt_dyn`` code."""

    def __init__(self):
        self.snopt = 0
        self.other = 0
        import torch.distributed as dist
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, real):
        def collective(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(_PACKAGE):
                frame = frame.f_back
            if frame is None:
                self.other += 1
            else:
                self.snopt += 1
            return real(*args, **kwargs)
        return collective


class Record(pl.Callback):
    """After ``SNOptCallback.on_before_optimizer_step``: per step, (refreshed, SNOpt collectives)."""

    def __init__(self, snopt: SNOptCallback, counter: Counter):
        self.snopt, self.counter, self.steps = snopt, counter, []
        self._seen = (0, 0)

    def on_train_start(self, trainer, pl_module):  # after a checkpoint's state was applied
        self._seen = (self.snopt.precond.refreshes, self.counter.snopt if self.counter else 0)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        refreshes, calls = self.snopt.precond.refreshes, self.counter.snopt if self.counter else 0
        self.steps.append({"step": self.snopt.precond.steps - 1, "refreshed": refreshes > self._seen[0],
                           "snopt_collectives": calls - self._seen[1]})
        self._seen = (refreshes, calls)


def fit(devices: int, epochs: int, resume=None, save_dir=None, counter=None):
    """Train; returns ``(learner, callback, record, trainer)``."""
    learner, callback = Learner(), SNOptCallback(**SNOPT)  # log=True: logging makes no collective
    record = Record(callback, counter)
    callbacks = [callback, record]
    if save_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=save_dir, filename="{epoch}", save_top_k=-1,
                                                      every_n_epochs=1, save_on_train_epoch_end=True))
    kwargs = dict(strategy="ddp", accelerator="cpu", devices=devices) if devices > 1 else \
        dict(accelerator="cpu", devices=1)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=save_dir is not None,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         num_sanity_val_steps=0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers, logging, ...
        warnings.filterwarnings("error", message="SNOpt")  # ... but a layer left unpreconditioned fails
        trainer.fit(learner, loader(devices), ckpt_path=resume)
    return learner, callback, record, trainer


def roles(callback: SNOptCallback) -> dict:
    """Each layer's role in SNOpt (``"ode"``: its factors come from the engine's solves)."""
    return {name: state["role"] for name, state in callback.state_dict()["snopt"]["layers"].items()}


def parameters(module: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("tag")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--save-checkpoints")
    p.add_argument("--resume")
    p.add_argument("--no-factor-all-reduce", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.no_factor_all_reduce:  # the experiment that shows the checks can fail
        from snopt_dyn.curvature import distributed
        distributed._all_reduce = lambda buffer: buffer
    counter = Counter()
    learner, callback, record, trainer = fit(args.devices, args.epochs, args.resume, args.save_checkpoints, counter)
    torch.save({"params": parameters(learner), "steps": record.steps, "other_collectives": counter.other,
                "world_size": trainer.world_size, "snopt_steps": callback.state_dict()["snopt"]["steps"],
                "roles": roles(callback)},
               os.path.join(args.out, f"{args.tag}-rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
