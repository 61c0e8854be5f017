"""The reference latent SDE (:class:`snopt_dyn.models.LatentSDE`) and the main job's ``sde`` task."""
from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch

torchsde = pytest.importorskip("torchsde")

from sde_helpers import engine_used
import snopt_dyn  # noqa: E402
from snopt_dyn.compare import cli  # noqa: E402
from snopt_dyn.compare.runner import compare  # noqa: E402
from snopt_dyn.compare.tasks import TASKS, TUNING, get_task  # noqa: E402
from snopt_dyn.models import LatentSDE, latent_sde  # noqa: E402

N, L, OBS = 3, 6, 2


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, L, OBS, generator=g, dtype=torch.float64)
    ts = torch.arange(L, dtype=torch.float64) * 0.25
    eps = torch.randn(N, 3, generator=g, dtype=torch.float64)
    return x, ts, eps


def _loss_and_grads(model):
    model.zero_grad()
    x, ts, eps = _data()
    bm = model.brownian(ts, N, entropy=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model.elbo(x, ts, bm=bm, eps=eps)
    used = engine_used(loss)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, used


def _model():
    torch.manual_seed(0)
    return LatentSDE(OBS, latent_dim=3, context_dim=4, hidden=8, dt=0.125).double()


def test_elbo_is_finite_and_every_part_gets_a_gradient():
    model = _model()
    loss, grads, _ = _loss_and_grads(model)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert name in grads and torch.isfinite(grads[name]).all(), name
    for part in ("gru.", "context.", "qz0_net.", "pz0_", "f_net.", "h_net.", "g_nets.", "decoder."):
        assert any(grads[n].abs().sum() > 0 for n in grads if n.startswith(part)), part
    for k in range(3):  # every per-channel diffusion network
        assert grads[f"g_nets.{k}.0.weight"].abs().sum() > 0


def test_wrapped_equals_unwrapped_for_the_same_brownian_path():
    plain = _model()
    wrapped = snopt_dyn.wrap(copy.deepcopy(plain))
    native = _loss_and_grads(plain)
    routed = _loss_and_grads(wrapped)
    assert routed[2] and not native[2]  # the wrapped model runs on the engine, the plain one on torchsde
    assert torch.equal(native[0], routed[0])
    assert native[1].keys() == routed[1].keys()
    for name in native[1]:
        torch.testing.assert_close(routed[1][name], native[1][name], rtol=1e-12, atol=0, msg=name)


def test_reconstruction_is_deterministic_for_a_seed():
    model = _model()
    x, ts, _ = _data()
    a = model.reconstruct(x, ts, samples=4, generator=torch.Generator().manual_seed(3))
    b = model.reconstruct(x, ts, samples=4, generator=torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)


def test_ito_uses_euler_and_runs():
    torch.manual_seed(0)
    model = LatentSDE(OBS, latent_dim=3, context_dim=4, hidden=8, dt=0.125, sde_type="ito").double()
    assert model.method == "euler" and model.adjoint_method is None
    x, ts, eps = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model.elbo(x, ts, bm=model.brownian(ts, N, entropy=7), eps=eps)
    loss.backward()
    assert torch.isfinite(loss) and model.f_net[0].weight.grad is not None
    with pytest.raises(ValueError, match="sde_type"):
        LatentSDE(OBS, sde_type="weird")


def test_missing_torchsde_names_the_extra(monkeypatch):
    monkeypatch.setattr(latent_sde, "torchsde", None)
    monkeypatch.setitem(sys.modules, "torchsde", None)  # import torchsde -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'snopt-dyn\[torchsde\]'"):
        latent_sde.import_torchsde()


def test_the_task_is_registered_and_listed():
    assert "sde" in TASKS and "sde" in TUNING
    assert "\n  sde " in cli.EPILOG
    task = get_task("sde")
    assert task.metric == "mse" and not task.higher_is_better
    with pytest.raises(ValueError, match="BasicMotions"):
        get_task("sde", "japanese_vowels")


def test_sde_task_smoke():
    task = get_task("sde").prepare("cpu", max_train=4, max_test=3)
    assert task.train_x.shape == (4, 100, 6) and task.test_x.shape == (3, 100, 6)
    assert torch.allclose(task.ts[1] - task.ts[0], torch.tensor(0.1)) and float(task.ts[-1]) == pytest.approx(9.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compare(task, ["snopt", "adam"], iters=2, eval_points=1, batch_size=2, progress=False)
    assert [r.name for r in result.runs] == ["snopt", "adam"]
    for run in result.runs:
        assert run.iters == 2 and run.status == "ok", (run.name, run.status)
        metrics = [e["test_metric"] for e in run.evals]
        assert len(metrics) >= 2 and all(m is not None and math.isfinite(m) and m > 0 for m in metrics)
        assert all(math.isfinite(row["train_loss"]) for row in run.rows if row.get("train_loss") is not None)
    model = task.make_model(0)
    assert task.evaluate(model) == task.evaluate(model)  # the metric is deterministic for a model
