"""Estimator parity with the main job: each model's SNOpt settings and rates are its task's, the ODE-RNN's
GRU cell on an Adam of its own, ``ODERNNRegressor``, and warm starts that continue the optimizer, SNOpt
and the batch order.

Tiny models (hidden 4, width 8) on 18 JapaneseVowels series cut to 10 steps keep every fit well under a
second.
"""
from __future__ import annotations

import inspect
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchcde")

import snopt_dyn  # noqa: E402
import snopt_dyn.estimators  # noqa: E402
from snopt_dyn import datasets, hooks  # noqa: E402
from snopt_dyn.estimators import NeuralCDEClassifier, ODERNNClassifier, ODERNNRegressor, training  # noqa: E402

#: 18 series in batches of 8: 3 steps per epoch (8, 8, 2); SNOpt refreshes every 4th step, so the
#: refreshes of a 2 + 2 epoch warm start (steps 0, 4, 8) differ from a restarted counter's (0, 4 | 6, 10)
PARITY = dict(hidden=4, width=8, batch_size=8, early_stopping=False, rtol=1e-2, atol=1e-2, verbose=0,
              random_state=0, snopt_options={"update_freq": 4})
#: warm start k + k epochs vs one fit of 2k: same weights to this absolute tolerance (measured: 0, bitwise)
ATOL = 1e-6


@pytest.fixture(scope="module")
def series():
    d = datasets.load_japanese_vowels("train")
    idx = np.linspace(0, len(d) - 1, 18).round().astype(int)
    X = [d.values[i, :min(10, int(d.lengths[i]))].numpy() for i in idx]
    return X, np.array(d.classes)[d.labels.numpy()[idx]]


@pytest.fixture
def made(monkeypatch):
    """Every ``(optimizer, SNOpt, weights before training)`` that ``fit`` builds."""
    out = []
    real = training.make_optimizer

    def spy(name, model, *args, **kwargs):
        optimizer, precond = real(name, model, *args, **kwargs)
        out.append((optimizer, precond, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return optimizer, precond

    monkeypatch.setattr(training, "make_optimizer", spy)
    return out


def _weights(est):
    return {k: v.detach().clone() for k, v in est.model_.state_dict().items()}


def _max_difference(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("cls", [ODERNNClassifier, NeuralCDEClassifier])
def test_warm_start_k_plus_k_epochs_equals_one_fit_of_2k(cls, series):
    """``fit`` (2 epochs) then a warm ``fit`` (2 more) gives the weights of one 4-epoch ``fit``: the
    optimizer's state (the GRU's Adam moments), SNOpt's state (bases, second moments, its step counter,
    so refreshes stay on schedule) and the batch-order generator continue; also through a pickle."""
    X, y = series
    full = cls(**dict(PARITY, max_epochs=4)).fit(X, y)
    warm = cls(**dict(PARITY, max_epochs=2, warm_start=True)).fit(X, y)
    revived = pickle.loads(pickle.dumps(warm))
    for est in (warm, revived):
        est.fit(X, y)
        assert _max_difference(_weights(est), _weights(full)) <= ATOL
        np.testing.assert_allclose(est.predict_proba(X), full.predict_proba(X), rtol=0, atol=ATOL)
        assert est.n_iter_ == full.n_iter_ == 4 and est.n_steps_ == full.n_steps_ == 12
    # after fit the model carries no SNOpt hook and no observer is left on the engine
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in warm.model_.modules())
    assert not any(getattr(o, "_layers", None) and next(iter(o._layers)) in set(warm.model_.modules())
                   for o in hooks.observers())


@pytest.mark.parametrize("cls", [ODERNNClassifier, NeuralCDEClassifier])
def test_the_cosine_schedule_scales_every_rate_by_the_budget_spent(cls, series, monkeypatch):
    """``schedule="cosine"``: at step k of K = max_epochs x steps per epoch every parameter group (the
    base SGD's and the GRU cell's Adam alike) runs at its rate x ``warmup_cosine(k / K)``; ``max_time``
    counts when it runs out first; ``"constant"`` leaves the rates alone."""
    from snopt_dyn.schedules import warmup_cosine

    seen = []
    real = training.make_optimizer

    def spy(*args, **kwargs):
        optimizer, precond = real(*args, **kwargs)
        step = optimizer.step

        def recorded():
            seen.append([g["lr"] for g in optimizer.param_groups])
            step()

        optimizer.step = recorded
        return optimizer, precond

    monkeypatch.setattr(training, "make_optimizer", spy)
    X, y = series
    base = [cls._default_lrs["snopt"]] + ([cls._default_lrs["adam"]] if cls is ODERNNClassifier else [])
    cls(**dict(PARITY, max_epochs=2, schedule="cosine")).fit(X, y)  # 3 steps per epoch
    assert len(seen) == 6
    for k, rates in enumerate(seen):
        assert rates == pytest.approx([lr * warmup_cosine(k / 6) for lr in base], rel=1e-12), k
    seen.clear()
    cls(**dict(PARITY, max_epochs=2)).fit(X, y)
    assert seen == [base] * 6
    seen.clear()
    cls(**dict(PARITY, max_epochs=1000, max_time=1e-9, schedule="cosine")).fit(X, y)  # out of time at once
    assert seen == [[lr * warmup_cosine(1.0) for lr in base]] and warmup_cosine(1.0) == 0.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        cls(**dict(PARITY, schedule="linear")).fit(X, y)


def test_a_warm_start_with_another_random_state_draws_a_new_batch_order(series):
    """The batch order continues only when ``random_state`` is the same int as before; another seed
    reseeds it (the optimizer and SNOpt state are kept either way)."""
    X, y = series
    full = ODERNNClassifier(**dict(PARITY, max_epochs=4)).fit(X, y)
    other = ODERNNClassifier(**dict(PARITY, max_epochs=2, warm_start=True)).fit(X, y)
    other.set_params(random_state=1).fit(X, y)
    assert _max_difference(_weights(other), _weights(full)) > 1e-4


# ----------------------------------------------------------------------------- the GRU cell's Adam
def _targets(cls, X, y):
    return y if cls is ODERNNClassifier else np.array([x[:, 0].mean() for x in X])


@pytest.mark.parametrize("cls, task", [(NeuralCDEClassifier, "timeseries"), (ODERNNClassifier, "latent")])
def test_each_model_takes_its_main_job_tasks_snopt_settings_and_rates(cls, task, made, series, monkeypatch):
    """What the main job measured and chose is what a user of the estimators gets: SNOpt's keyword
    arguments, with SNOpt's own defaults filled in (the task's, less the keys of its base optimizer
    and schedule: the estimators run at a constant rate) and the learning rates ``lr=None`` picks."""
    from snopt_dyn.compare import get_task
    from snopt_dyn.compare.optimizers import BASE_KEYS

    signature = inspect.signature(snopt_dyn.SNOpt.__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}
    kwargs = []
    real = snopt_dyn.SNOpt

    def spy(model, **kw):
        kwargs.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(training.snopt_dyn, "SNOpt", spy)
    spec = get_task(task)
    X, y = series
    for name in ("snopt", "adam", "sgd"):
        cls(**dict(PARITY, optimizer=name, snopt_options=None, max_epochs=1)).fit(X, y)
        optimizer = made[-1][0]
        first = optimizer.optimizers[0] if isinstance(optimizer, training.CombinedOptimizer) else optimizer
        assert first.param_groups[0]["lr"] == spec.lrs[name], name
    chosen = {k: v for k, v in kwargs[0].items() if k != "skip"}
    assert {**defaults, **chosen} == {**defaults, **{k: v for k, v in spec.snopt.items() if k not in BASE_KEYS}}


@pytest.mark.parametrize("cls", [ODERNNClassifier, ODERNNRegressor])
def test_odernn_gives_its_gru_cell_an_adam_at_the_latent_tasks_rate(cls, made, series):
    """As the main job's latent task (``rest=adam``): SNOpt's base SGD (lr 1e-2) steps the Linear
    layers it preconditions, an Adam (lr 1e-2) the GRU cell -- so one step moves every GRU weight by
    1e-2 (Adam's first step is lr times the gradient's sign); ``rest="sgd"`` is the paper's setting."""
    X, y = series
    t = _targets(cls, X, y)
    est = cls(**dict(PARITY, max_epochs=1, batch_size=32)).fit(X, t)  # one step
    optimizer, precond, before = made[-1]
    assert isinstance(optimizer, training.CombinedOptimizer)
    sgd, adam = optimizer.optimizers
    cell = list(est.model_.cell.parameters())
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["lr"] == 1e-2
    assert {id(p) for p in sgd.param_groups[0]["params"]} == {id(p) for p in precond.preconditioned_parameters()}
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["lr"] == 1e-2
    assert [id(p) for p in adam.param_groups[0]["params"]] == [id(p) for p in precond.unpreconditioned_parameters()] \
        == [id(p) for p in cell]
    moved = torch.cat([(p.detach() - before[f"cell.{n}"]).abs().flatten() for n, p in est.model_.cell.named_parameters()])
    moved = moved[moved > 0]
    assert len(moved) > 0.9 * sum(p.numel() for p in cell)
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), rtol=1e-3, atol=0)

    paper = cls(**dict(PARITY, max_epochs=1, batch_size=32, snopt_options={"rest": "sgd"})).fit(X, t)
    optimizer, _, before = made[-1]
    assert type(optimizer) is torch.optim.SGD
    moved = (paper.model_.cell.weight_hh.detach() - before["cell.weight_hh"]).abs()
    assert float(moved.max()) > 2 * float(moved[moved > 0].min())  # raw gradient steps, not sign steps
    with pytest.raises(ValueError, match="rest"):
        cls(**dict(PARITY, snopt_options={"rest": "lbfgs"})).fit(X, t)


def test_odernn_regressor_is_exported_and_regresses(series):
    """``ODERNNRegressor`` sits next to ``ODERNNClassifier``; 1-D and 2-D targets (its scikit-learn
    checks run in ``tests/test_estimators.py``)."""
    assert "ODERNNRegressor" in snopt_dyn.estimators.__all__ and snopt_dyn.estimators.ODERNNRegressor is ODERNNRegressor
    X, _ = series
    y = np.array([x[:, 0].mean() for x in X])
    one = ODERNNRegressor(**dict(PARITY, max_epochs=1)).fit(X, y)
    assert one.predict(X).shape == (len(X),) and np.isfinite(one.predict(X)).all()
    two = ODERNNRegressor(**dict(PARITY, max_epochs=1)).fit(X, np.stack([y, -y], 1))
    assert two.predict(X).shape == (len(X), 2) and two.n_outputs_ == 2


def test_a_warm_start_continues_the_adam_at_the_current_rates_and_a_new_optimizer_starts_fresh(made, series):
    """The second ``fit`` loads the first's Adam moments (step count 1 -> 2) but runs at the rates set
    since (``lr``, ``rest_lr``); switching ``optimizer`` starts that optimizer fresh, weights kept."""
    X, y = series
    est = ODERNNClassifier(**dict(PARITY, max_epochs=1, batch_size=32, warm_start=True)).fit(X, y)
    est.set_params(lr=0.05, snopt_options={"update_freq": 4, "rest_lr": 3e-3}).fit(X, y)
    optimizer, precond, _ = made[-1]
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 3e-3]
    adam = optimizer.optimizers[1]
    assert all(float(adam.state[p]["step"]) == 2 for p in est.model_.cell.parameters())
    assert precond.steps == 2 and precond.refreshes == 0  # first_basis=10: no eigenbasis in two steps
    weights = _weights(est)
    est.set_params(optimizer="adam").fit(X, y)
    optimizer, precond, before = made[-1]
    assert precond is None and type(optimizer) is torch.optim.Adam
    assert all(float(s["step"]) == 1 for s in optimizer.state.values())
    assert _max_difference(before, weights) == 0 and est.n_steps_ == 3
