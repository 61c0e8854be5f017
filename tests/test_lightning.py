"""SNOptCallback with a real ``pl.Trainer`` on CPU: build, precondition, log, checkpoint, resume."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchdiffeq import odeint_adjoint

import snopt_dyn

pl = pytest.importorskip("pytorch_lightning")
from snopt_dyn.lightning import SNOptCallback  # noqa: E402

DT = torch.float64


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, t, y):
        return self.net(y)


class Horizon(nn.Module):
    """One solve per forward on [0, 1]: the horizon can be made trainable by wrap."""

    tol = 1e-6

    def __init__(self):
        super().__init__()
        self.field = Field()

    def forward(self, x):
        return odeint_adjoint(self.field, x, torch.tensor([0.0, 1.0], dtype=x.dtype), rtol=self.tol, atol=self.tol)[-1]


class Learner(pl.LightningModule):
    """A torchdiffeq classifier: the wrapped field is solved inside training_step."""

    def __init__(self, horizon=False):
        super().__init__()
        torch.manual_seed(0)
        self.ode = Horizon().to(DT)
        snopt_dyn.wrap(self.ode, train_terminal_time=horizon, terminal_time=1.0 if horizon else None)
        self.head = nn.Linear(2, 3).to(DT)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.ode(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def _loader(batch_size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, dtype=DT, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def _fit(learner, callback, max_epochs, ckpt_path=None, batch_size=8, accumulate=1):
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(learner, _loader(batch_size), ckpt_path=ckpt_path)
    return trainer


def _params(module):
    return [p.detach().clone() for p in module.parameters()] + [b.detach().clone() for b in module.buffers()]


SNOPT = dict(update_freq=3, damping=0.05, num_samples=4)
HORIZON = dict(lr=0.1, reg=1e-3, update_freq=2)


def test_callback_builds_preconditions_and_logs(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    learner, callback = Learner(), SNOptCallback(**SNOPT)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(learner, _loader())
    state = callback.state_dict()["snopt"]
    assert state["steps"] == 4 and state["refreshes"] == 2  # 32 / 8 batches, one step() each
    roles = {name: s["role"] for name, s in state["layers"].items()}
    assert roles["ode.field.net.0"] == "ode" and roles["head"] == "static"
    lines = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()
    header = lines[0].split(",")
    for key in ("snopt/steps", "snopt/refreshes", "snopt/step_time", "snopt/sampling_nfe"):
        assert key in header, header
    steps = [float(row.split(",")[header.index("snopt/steps")]) for row in lines[1:]
             if row.split(",")[header.index("snopt/steps")]]
    assert steps == [1.0, 2.0, 3.0, 4.0], steps  # logged after each step()


@pytest.mark.parametrize("horizon", [False, True], ids=["snopt", "snopt_and_terminal_time"])
def test_resumed_from_a_checkpoint_equals_uninterrupted(tmp_path, horizon):
    kwargs = dict(SNOPT, terminal_time=HORIZON) if horizon else SNOPT
    straight = Learner(horizon)
    _fit(straight, SNOptCallback(**kwargs), max_epochs=2)  # 8 steps, refreshes at 0, 3, 6

    first = Learner(horizon)
    trainer = _fit(first, SNOptCallback(**kwargs), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, callback = Learner(horizon), SNOptCallback(**kwargs)
    _fit(resumed, callback, max_epochs=2, ckpt_path=tmp_path / "half.ckpt")
    for a, b in zip(_params(straight), _params(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if horizon:
        assert float(resumed.ode.terminal_time) != 1.0  # the horizon moved, and resumed exactly

    # the check can fail: without SNOpt's saved state the resumed run differs
    lost = Learner(horizon)
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=False)
    ckpt["callbacks"] = {}
    torch.save(ckpt, tmp_path / "lost.ckpt")
    _fit(lost, SNOptCallback(**kwargs), max_epochs=2, ckpt_path=tmp_path / "lost.ckpt")
    assert any(float((a - b).abs().max()) > 1e-9 for a, b in zip(_params(straight), _params(lost)))


def test_accumulate_grad_batches_equals_the_doubled_batch(monkeypatch):
    """Two accumulated batches of 8 give the update of one batch of 16 (Lightning scales each loss by
    1/2; SNOpt's statistics must combine the two backward passes of a refresh).  Tight solves: the
    adaptive steps of a batch of 16 and of two batches of 8 differ within the solver tolerance."""
    monkeypatch.setattr(Horizon, "tol", 1e-11)
    def run(batch_size, accumulate):
        learner, callback = Learner(), SNOptCallback(**SNOPT)
        _fit(learner, callback, max_epochs=1, batch_size=batch_size, accumulate=accumulate)
        return learner, callback

    doubled, cb_d = run(16, 1)
    accumulated, cb_a = run(8, 2)
    assert cb_d.state_dict()["snopt"]["steps"] == cb_a.state_dict()["snopt"]["steps"] == 2
    for a, b in zip(_params(doubled), _params(accumulated)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
