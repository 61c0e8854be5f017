"""SNOpt's update rules (issue 20): Adam in the eigenbasis, factor averaging, burn-in, weight decay.

Invariances, each able to fail (float64, tight tolerances):

* with identity bases ``rule="adam"`` is ``torch.optim.Adam`` / ``AdamW`` (with and without burn-in);
* ``rule="adam"`` with ``moment="paper"``, ``power=1``, ``beta1=0``, no bias correction reproduces
  today's rule bit for bit, refreshes included;
* a rebuild that returns the same basis, or a permutation or sign flip of it, leaves every update
  unchanged (the moments are carried across);
* sum vs mean loss and micro-batch accumulation still hold (the 2-rank DDP equality is in
  ``tests/test_distributed.py``);
* ``state_dict`` round-trips mid-run; no host synchronisation is added per step;
* the factor average, the burn-in schedule and order, the warm QR basis and the weight decay do
  what their modules say.
"""
import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snopt_dyn
from snopt_dyn.curvature import ekfac, warm_basis
import test_curvature
from test_curvature import ODEModel, _assert_same, _data, _run
from test_sync_count import Model as SyncModel
from test_sync_count import count_syncs, total

DT = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=DT)


class MLP(nn.Module):
    """Two static layers whose factor sizes all differ (5, 6, 7, 2), so a size names a factor."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _batches(n_steps, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT))
            for _ in range(n_steps)]


def _train(model, precond, opt, batches, record=None):
    """SGD (or any ``opt``) with SNOpt over ``batches``; ``record``: the .grad after every step()."""
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if precond is not None:
            precond.step()
        if record is not None:
            record.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()


class FakeEigh:
    """Stands in for :func:`ekfac.eigh`: a fixed orthonormal basis per factor (identity, or random),
    transformed at the k-th rebuild by ``transform(k, size)`` (a signed permutation)."""

    def __init__(self, kind="identity", transform=None):
        self.kind, self.transform, self.calls = kind, transform, {}

    def __call__(self, mat, name):
        size = mat.shape[0]
        key = (name, size)
        k = self.calls[key] = self.calls.get(key, -1) + 1
        if self.kind == "identity":
            u = torch.eye(size, dtype=mat.dtype)
        else:
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{size}".encode()))
            u = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=DT))[0].to(mat.dtype)
        s = torch.linspace(1.0, 2.0, size, dtype=mat.dtype)
        if self.transform is not None:
            t = self.transform(k, size).to(mat.dtype)
            u, s = u @ t, s @ t.abs()
        return s, u


def _signed_permutation(seed, size, permute=True, flip=True):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(size, generator=g) if permute else torch.arange(size)
    signs = torch.randint(0, 2, (size,), generator=g).to(DT) * 2 - 1 if flip else torch.ones(size, dtype=DT)
    return torch.eye(size, dtype=DT)[:, perm] * signs


# ------------------------------------------------------------------------ 1. identity bases = Adam
#: (burn_in, first_basis) -> the rebuilds over 10 steps with update_freq=2
IDENTITY_SCHEDULES = {(0, 0): 5, (2, 0): 5, (0, 3): 4, (2, 3): 3}


@pytest.mark.parametrize("burn_in,first_basis", list(IDENTITY_SCHEDULES))
@pytest.mark.parametrize("reference", ["adam", "adamw", "soap-betas"])
def test_identity_bases_make_the_rule_torch_adam(monkeypatch, reference, burn_in, first_basis):
    """Forced identity bases: SNOpt(rule="adam") + SGD(lr) takes torch.optim.Adam's (AdamW's)
    steps to 1e-6 over 10 steps with rebuilds every 2 (moments carried through every rebuild).
    With burn_in=K the K batches from the first basis's iteration on only gather factors (no step,
    as SOAP's first step): Adam skips those batches.  first_basis=D: D steps in the weights' own
    basis first, then the moments carried into the first basis."""
    monkeypatch.setattr(ekfac, "eigh", FakeEigh("identity"))
    torch.manual_seed(0)
    ours, theirs = MLP().double(), MLP().double()
    theirs.load_state_dict(ours.state_dict())
    betas, wd = ((0.95, 0.95) if reference == "soap-betas" else (0.9, 0.999)), (0.1 if reference == "adamw" else 0.0)
    lr, eps = 0.01, 1e-8
    precond = snopt_dyn.SNOpt(ours, rule="adam", beta1=betas[0], beta2=betas[1], eps=eps, power=0.5,
                              weight_decay=wd, update_freq=2, burn_in=burn_in, first_basis=first_basis)
    Adam = torch.optim.AdamW if reference == "adamw" else torch.optim.Adam
    adam = Adam(theirs.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    sgd = torch.optim.SGD(ours.parameters(), lr=lr)
    batches = _batches(10)
    for step in range(len(batches)):
        _train(ours, precond, sgd, batches[step:step + 1])
        if not first_basis <= step < first_basis + burn_in:
            _train(theirs, None, adam, batches[step:step + 1])
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            err = float((p - q).detach().abs().max() / q.detach().abs().max())
            assert err < 1e-6, f"step {step} {name}: {err:.3g}"
    # rebuilds at 0, 2, .., 8; with burn-in 1, 3, .., 9; first_basis=3: 3, 5, 7, 9; both: 4, 6, 8
    assert precond.refreshes == IDENTITY_SCHEDULES[burn_in, first_basis]


# ------------------------------------------------------------------------ 2. today's rule bit for bit
@pytest.mark.parametrize("case", ["mean", "sum", "schedules", "per-step-refresh"])
def test_adam_rule_at_p1_without_momentum_is_todays_rule_bit_for_bit(case):
    """rule="adam", moment="paper", power=1, beta1=0, no bias correction, eps=damping: the .grad
    after every step (refreshes at 0, 3, 6) is identical to the default rule's."""
    kwargs = dict(update_freq=3, num_samples=4)
    reduction = "sum" if case == "sum" else "mean"
    if case == "sum":
        kwargs["loss_reduction"] = "sum"
    if case == "schedules":
        kwargs.update(damping=lambda k: 0.05 / (k + 1), alpha=lambda k: 0.5 + 0.01 * k)
    if case == "per-step-refresh":
        kwargs["update_freq"] = 1
    runs = []
    for rule in (dict(), dict(rule="adam", moment="paper", power=1, beta1=0, bias_correction=False)):
        torch.manual_seed(1)
        model = ODEModel().double()
        precond = snopt_dyn.SNOpt(model, **kwargs, **rule)
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        grads = []
        g = torch.Generator().manual_seed(2)
        for _ in range(7):
            x, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)
            opt.zero_grad()
            F.mse_loss(model(x), y, reduction=reduction).backward()
            precond.step()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        runs.append(grads)
        precond.remove()
    for step, (a, b) in enumerate(zip(*runs)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step} {name}: {(a[name] - b[name]).abs().max():.3g}"


# ------------------------------------------------------------------------ 3. basis changes
CHANGES = {
    "same": dict(permute=False, flip=False),
    "permutation": dict(permute=True, flip=False),
    "sign-flip": dict(permute=False, flip=True),
    "both": dict(permute=True, flip=True),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_rebuild_returning_the_same_basis_permuted_or_flipped_changes_nothing(monkeypatch, change):
    """Rebuilds at 2, 4, 6 that return the first basis (permuted / sign-flipped) give the same
    updates as no rebuild at all: both moments are carried into the new basis correctly."""

    def transform(k, size):
        if k == 0:
            return torch.eye(size, dtype=DT)
        return _signed_permutation(100 * k + size, size, **CHANGES[change])

    def run(update_freq, fake):
        monkeypatch.setattr(ekfac, "eigh", fake)
        torch.manual_seed(3)
        model = MLP().double()
        precond = snopt_dyn.SNOpt(model, rule="adam", beta1=0.9, beta2=0.99, update_freq=update_freq)
        grads = []
        _train(model, precond, torch.optim.SGD(model.parameters(), lr=0.01), _batches(8, seed=4), grads)
        return grads, precond.refreshes

    want, n_want = run(100, FakeEigh("random"))
    got, n_got = run(2, FakeEigh("random", transform))
    assert (n_want, n_got) == (1, 4)
    _assert_same(got, want, rtol=1e-10)
    # the test can see a basis change: a rebuild into a genuinely different basis changes the updates
    def rotate(k, size):
        noise = torch.randn(size, size, generator=torch.Generator().manual_seed(k), dtype=DT)
        return torch.eye(size, dtype=DT) if k == 0 else torch.linalg.qr(torch.eye(size, dtype=DT) + 0.5 * noise)[0]

    other, _ = run(2, FakeEigh("random", rotate))
    with pytest.raises(AssertionError):
        _assert_same(other, want, rtol=1e-6)


def test_warm_qr_step_keeps_an_exact_eigenbasis_and_improves_a_stale_one():
    g = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))[0]
    s = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=DT)
    mat = q @ torch.diag(s) @ q.t()
    got_s, got_u = warm_basis.power_qr(mat, q[:, torch.randperm(6, generator=g)])
    torch.testing.assert_close(got_s, s)
    torch.testing.assert_close((got_u.t() @ q).abs(), torch.eye(6, dtype=DT))
    stale = torch.linalg.qr(q + 0.1 * torch.randn(6, 6, generator=g, dtype=DT))[0]

    def off_diagonal(u):
        d = u.t() @ mat @ u
        return float((d - torch.diag(d.diagonal())).norm())

    assert off_diagonal(warm_basis.power_qr(mat, stale)[1]) < 0.5 * off_diagonal(stale)


def test_eigh_every_uses_the_warm_qr_step_between_full_eigendecompositions(monkeypatch):
    calls = {"eigh": 0, "qr": 0}
    real_eigh, real_qr = ekfac.eigh, warm_basis.power_qr
    monkeypatch.setattr(ekfac, "eigh", lambda *a: calls.__setitem__("eigh", calls["eigh"] + 1) or real_eigh(*a))
    monkeypatch.setattr(warm_basis, "power_qr", lambda *a: calls.__setitem__("qr", calls["qr"] + 1) or real_qr(*a))
    torch.manual_seed(6)
    model = MLP().double()
    precond = snopt_dyn.SNOpt(model, rule="adam", update_freq=2, eigh_every=3, factor_ema=0.9)
    _train(model, precond, torch.optim.SGD(model.parameters(), lr=0.01), _batches(12, seed=6))
    # 6 rebuilds (0, 2, ..., 10): full at rebuilds 0 and 3, QR at the other four; 2 layers x 2 factors
    assert precond.refreshes == 6 and calls == {"eigh": 2 * 4, "qr": 4 * 4}
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_first_basis_is_torch_adam_without_sampling_until_its_iteration():
    """first_basis=D with real eigendecompositions: the first D steps sample nothing (no sampling
    evaluation, no refresh) and equal torch.optim.Adam to 1e-10; iteration D samples and builds the
    first basis, and from then on the updates leave Adam's (the test can fail both ways)."""
    torch.manual_seed(13)
    ours = ODEModel().double()
    theirs = copy.deepcopy(ours)
    precond = snopt_dyn.SNOpt(ours, rule="adam", update_freq=3, num_samples=4, first_basis=4)
    sgd = torch.optim.SGD(ours.parameters(), lr=0.01)
    adam = torch.optim.Adam(theirs.parameters(), lr=0.01)
    x, y = _data(8)
    sampled, gap = [], []
    for step in range(7):
        sampled.append(precond.refreshing)
        for model, opt in ((ours, sgd), (theirs, adam)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            if model is ours:
                precond.step()
            opt.step()
        gap.append(max(float((p - q).detach().abs().max()) for p, q in zip(ours.parameters(), theirs.parameters())))
        if step < 4:
            assert precond.sampling_nfe == 0 and precond.refreshes == 0, step
    assert sampled == [False, False, False, False, True, False, False]
    assert precond.refreshes == 1 and precond.sampling_nfe > 0
    assert max(gap[:4]) < 1e-10 and gap[4] > 1e-6, gap


def test_first_basis_carries_the_moments_into_a_permuted_first_basis(monkeypatch):
    """A first basis (built at iteration D) that is a signed permutation of the identity changes
    no update: the moments of the D steps in the weights' own basis are carried into it exactly."""
    def run(first_basis, transform):
        monkeypatch.setattr(ekfac, "eigh", FakeEigh("identity", transform))
        torch.manual_seed(14)
        model = MLP().double()
        precond = snopt_dyn.SNOpt(model, rule="adam", beta1=0.9, beta2=0.99, update_freq=100,
                                  first_basis=first_basis)
        grads = []
        _train(model, precond, torch.optim.SGD(model.parameters(), lr=0.01), _batches(8, seed=15), grads)
        return grads, precond.refreshes

    want, _ = run(0, None)
    got, n = run(3, lambda k, size: _signed_permutation(7 + size, size))
    assert n == 1
    _assert_same(got, want, rtol=1e-10)
    # without the carry the moments would restart at the first basis: the test sees that
    def restart(self, st, kronecker, old_g, old_a):
        st.m1 = st.m2 = None
    with monkeypatch.context() as patch:
        patch.setattr(snopt_dyn.SNOpt, "_new_moments", restart)
        lost, _ = run(3, lambda k, size: _signed_permutation(7 + size, size))
    with pytest.raises(AssertionError):
        _assert_same(lost, want, rtol=1e-6)


def test_first_moments_restart_is_adam_then_a_fresh_adam(monkeypatch):
    """first_moments="restart" with identity bases: D steps of torch.optim.Adam, then a *new*
    torch.optim.Adam from the weights reached (zero moments, step count from 1), to 1e-6; the
    default carry matches the one uninterrupted Adam instead, so the test tells the two apart."""
    monkeypatch.setattr(ekfac, "eigh", FakeEigh("identity"))
    D, batches = 3, _batches(9, seed=16)

    def run(first_moments):
        torch.manual_seed(2)
        model = MLP().double()
        precond = snopt_dyn.SNOpt(model, rule="adam", beta1=0.9, beta2=0.99, update_freq=2, first_basis=D,
                                  first_moments=first_moments)
        _train(model, precond, torch.optim.SGD(model.parameters(), lr=0.01), batches)
        return [p.detach() for p in model.parameters()]

    torch.manual_seed(2)
    theirs = MLP().double()
    for part in (batches[:D], batches[D:]):  # a fresh Adam for each part
        _train(theirs, None, torch.optim.Adam(theirs.parameters(), lr=0.01, betas=(0.9, 0.99)), part)
    want = [p.detach() for p in theirs.parameters()]
    for p, q in zip(run("restart"), want):
        assert float((p - q).abs().max() / q.abs().max()) < 1e-6
    carried = run("carry")
    assert max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(carried, want)) > 1e-4


def test_first_moments_restart_ignores_a_signed_permutation_of_the_first_basis(monkeypatch):
    """Restarted at the first basis, Adam's moments start there from zero, so a first basis that is a
    signed permutation of another gives the same updates (Adam commutes with signed permutations);
    later rebuilds still carry the moments, so a permuted second basis changes nothing either."""
    def run(transform, first_moments="restart"):
        monkeypatch.setattr(ekfac, "eigh", FakeEigh("random", transform))
        torch.manual_seed(17)
        model = MLP().double()
        precond = snopt_dyn.SNOpt(model, rule="adam", beta1=0.9, beta2=0.99, update_freq=3, first_basis=2,
                                  first_moments=first_moments)
        grads = []
        _train(model, precond, torch.optim.SGD(model.parameters(), lr=0.01), _batches(9, seed=18), grads)
        return grads, precond.refreshes

    want, n = run(None)
    got, _ = run(lambda k, size: _signed_permutation(31 * k + size, size))
    assert n == 3  # rebuilds at 2, 5, 8
    _assert_same(got, want, rtol=1e-10)
    carried, _ = run(None, "carry")  # the carry rotates the identity-basis moments into a random basis
    with pytest.raises(AssertionError):
        _assert_same(carried, want, rtol=1e-6)


# ------------------------------------------------------------------------ 4. losses & batches
ADAM_CONFIGS = {
    "adam": dict(rule="adam"),
    "adam-p1-paper-ema-burnin-qr": dict(rule="adam", moment="paper", power=1, beta1=0.5, factor_ema=0.5,
                                        burn_in=1, eigh_every=2),
    "adam-p075-ema-burnin": dict(rule="adam", power=0.75, eps=1e-6, beta1=0.95, beta2=0.95, factor_ema=0.9,
                                 burn_in=2),
    "adam-relative-eps": dict(rule="adam", relative_eps=0.3),
}
#: first_basis refuses loss_reduction="sum" (test_bad_options_are_refused), so only here
MICRO_BATCH_CONFIGS = {**ADAM_CONFIGS, "adam-first-basis": dict(rule="adam", first_basis=2, beta1=0.95),
                       "adam-first-basis-restart": dict(rule="adam", first_basis=2, first_moments="restart")}


@pytest.mark.parametrize("config", list(ADAM_CONFIGS))
def test_sum_loss_is_batch_times_mean_loss_with_the_new_rules(config):
    """As ``tests/test_curvature.py`` for today's rule: ``loss_reduction="sum"`` on the summed loss
    gives B x the mean loss's update at every step (with lr/B the two runs step identically)."""
    torch.manual_seed(7)
    a = ODEModel().double()
    b = copy.deepcopy(a)
    x, y = _data(8)
    B = x.shape[0]
    kwargs = ADAM_CONFIGS[config]
    got = _run(a, lambda s: [lambda m: F.mse_loss(m(x), y, reduction="sum")], steps=5, lr=0.005 / B,
               loss_reduction="sum", **kwargs)
    want = _run(b, lambda s: [lambda m: F.mse_loss(m(x), y, reduction="sum") / B], steps=5, lr=0.005, **kwargs)
    _assert_same(got, want, factor=B)


@pytest.mark.parametrize("config", list(MICRO_BATCH_CONFIGS))
def test_accumulated_micro_batches_equal_one_batch_with_the_new_rules(monkeypatch, config):
    """Two accumulated halves = one batch at every step.  On a fixed grid (rk4, 1/16), so the halves
    and the whole batch solve on the same steps: with dopri5 each half picks its own steps, and the
    Adam rule's first step (m/v^p, sign-like) lifts that 1e-10 solver difference in near-zero rotated
    coordinates to ~1e-6 of the update."""
    monkeypatch.setattr(test_curvature, "SOLVE", dict(method="rk4", options=dict(step_size=1 / 16)))
    torch.manual_seed(8)
    a = ODEModel().double()
    b = copy.deepcopy(a)
    x, y = _data(12)
    halves = [(x[:6], y[:6]), (x[6:], y[6:])]
    kwargs = MICRO_BATCH_CONFIGS[config]
    got = _run(a, lambda s: [lambda m, xb=xb, yb=yb: F.mse_loss(m(xb), yb) / 2 for xb, yb in halves], steps=5,
               lr=0.005, **kwargs)
    want = _run(b, lambda s: [lambda m: F.mse_loss(m(x), y)], steps=5, lr=0.005, **kwargs)
    _assert_same(got, want)


# ------------------------------------------------------------------------ 5. state_dict
RESUME_CONFIGS = {
    "adam-everything": dict(rule="adam", beta1=0.9, beta2=0.95, factor_ema=0.5, eigh_every=2, burn_in=2,
                            weight_decay=1e-3),
    "adam-paper": dict(rule="adam", moment="paper", power=1, beta1=0.5),
    "ekfac-ema-qr-wd": dict(factor_ema=0.7, eigh_every=2, weight_decay=1e-3, burn_in=1),
    "adam-relative-eps": dict(rule="adam", relative_eps=0.3, power=0.75),
    "adam-first-basis": dict(rule="adam", first_basis=7),  # saved inside the first 7 steps
    "adam-first-basis-restart": dict(rule="adam", first_basis=3, first_moments="restart"),  # restarted at 3, saved at 5
}


@pytest.mark.parametrize("config", list(RESUME_CONFIGS))
def test_state_dict_round_trip_resumes_identically(config):
    """Save after 5 steps, load into a fresh SNOpt on a fresh model, run 5 more: equal to 10 steps
    uninterrupted (moments, step counts, averaged factors and the rebuild count all persist)."""
    torch.manual_seed(9)
    base = ODEModel().double()
    batches = _batches(10, seed=9)

    def make():
        model = copy.deepcopy(base)
        return model, torch.optim.SGD(model.parameters(), lr=0.01), \
            snopt_dyn.SNOpt(model, update_freq=2, num_samples=4, **RESUME_CONFIGS[config])

    m1, o1, p1 = make()
    _train(m1, p1, o1, batches)
    m2, o2, p2 = make()
    _train(m2, p2, o2, batches[:5])
    ckpt = copy.deepcopy({"model": m2.state_dict(), "opt": o2.state_dict(), "precond": p2.state_dict()})
    m3, o3, p3 = make()
    m3.load_state_dict(ckpt["model"]); o3.load_state_dict(ckpt["opt"]); p3.load_state_dict(ckpt["precond"])
    _train(m3, p3, o3, batches[5:])
    for (name, a), b in zip(m1.named_parameters(), m3.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert p3.refreshes == p1.refreshes and p3.steps == p1.steps == 10


# ------------------------------------------------------------------------ 6. host syncs
NEW_RULES = dict(rule="adam", beta1=0.9, factor_ema=0.5, eigh_every=2, burn_in=1, weight_decay=1e-3)


def test_the_new_rules_add_no_host_sync():
    """SNOpt's own host syncs per iteration (refresh, QR rebuild and plain ones) are the same with
    every new option on as with today's rule."""
    counts = {}
    for name, options in (("today", {}), ("new", NEW_RULES)):
        torch.manual_seed(0)
        model = SyncModel(3, "torchdiffeq", "dopri5", None, 1e-4).to(DT)
        precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=4, **options)
        x = torch.randn(8, 3, dtype=DT)
        per_step = []
        for _ in range(6):  # rebuilds at 0, 2, 4 (the one at 2 a QR step for "new")
            model.zero_grad()
            with count_syncs() as c:
                model(x).pow(2).sum().backward()
                precond.step()
            per_step.append(total(c, "snopt"))
        counts[name] = per_step
    print("\nSNOpt syncs per iteration:", counts)
    assert counts["new"] == counts["today"]


# ------------------------------------------------------------------------ 7. the pieces
def test_factor_average_and_burn_in_mean(monkeypatch):
    """factor_ema=λ: the factors are Σ λ^(n-k) F_k / Σ λ^(n-k); burn-in batches enter with equal weight."""
    batches = _batches(7, seed=10)

    def factors_per_step(**kwargs):
        torch.manual_seed(10)
        model = MLP().double()
        precond = snopt_dyn.SNOpt(model, update_freq=2, **kwargs)
        out = []
        for x, y in batches:  # lr 0: the weights stay put, so each batch's factors are known
            model.zero_grad()
            F.mse_loss(model(x), y).backward()
            precond.step()
            out.append({k: v[:2] for k, v in precond.factors().items()})
        return out

    single = factors_per_step()  # rebuilds at 0, 2, 4, 6 from that batch alone
    lam = 0.6
    averaged = factors_per_step(factor_ema=lam)
    for name in ("l1", "l2"):
        for i in (0, 1):
            f0, f2, f4 = (single[s][name][i] for s in (0, 2, 4))
            torch.testing.assert_close(averaged[0][name][i], f0)
            torch.testing.assert_close(averaged[4][name][i], (lam * lam * f0 + lam * f2 + f4) / (lam * lam + lam + 1))
    burnt = factors_per_step(burn_in=3)  # gathers at 0, 1, 2 (mean), then 4, 6 (own batch)

    def own(step):
        torch.manual_seed(10)
        model = MLP().double()
        precond = snopt_dyn.SNOpt(model, update_freq=1)
        x, y = batches[step]
        F.mse_loss(model(x), y).backward()
        precond.step()
        return {k: v[:2] for k, v in precond.factors().items()}

    per_batch = [own(s) for s in range(3)]
    for name in ("l1", "l2"):
        for i in (0, 1):
            torch.testing.assert_close(burnt[2][name][i], sum(f[name][i] for f in per_batch) / 3)
            torch.testing.assert_close(burnt[4][name][i], single[4][name][i])


def test_burn_in_schedule_and_order():
    """burn_in=K: iterations 0..K-1 sample; the basis is built after iteration K-1's update and
    rebuilt every update_freq after that, each time *after* the update that sampled it."""
    torch.manual_seed(11)
    model = MLP().double()
    precond = snopt_dyn.SNOpt(model, update_freq=4, burn_in=3)
    batches = _batches(11, seed=11)
    sampling, raw_steps = [], []
    for step, (x, y) in enumerate(batches):
        sampling.append(precond.refreshing)
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = copy.deepcopy(precond.state_dict())
        precond.step()
        after = precond.state_dict()["layers"]["l1"]
        if step < 3:  # burn-in: no basis yet, so the preconditioned layers take no step
            raw_steps.append(all(bool((p.grad == 0).all()) and bool((raw[n] != 0).any())
                                 for n, p in model.named_parameters()))
        if step == 6:  # a rebuild: the update used the basis of step 2, then the basis changed
            layer = model.l1
            grad = torch.cat([raw["l1.weight"], raw["l1.bias"][:, None]], 1)
            old = before["layers"]["l1"]
            want = ekfac.precondition(grad, old["u_g"], old["u_a"], old["m2"].clone(), 0.05, (0.75, 8, 1.0))
            torch.testing.assert_close(torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1), want,
                                       rtol=1e-12, atol=1e-14)
            assert not torch.equal(after["u_a"], old["u_a"])
    assert sampling == [True, True, True, False, False, False, True, False, False, False, True]
    assert raw_steps == [True, True, True] and precond.refreshes == 3  # built at 2, 6, 10


@pytest.mark.parametrize("rule", [dict(), dict(rule="adam")])
def test_weight_decay_is_decoupled_for_every_rule(rule):
    """weight_decay=λ writes update + λW: the .grad differs from λ=0's by exactly λW at every step
    when both runs see the same weights (lr 0)."""
    grads = []
    for wd in (0.0, 0.3):
        torch.manual_seed(12)
        model = ODEModel().double()
        precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=3, weight_decay=wd, **rule)
        record = []
        _train(model, precond, torch.optim.SGD(model.parameters(), lr=0.0), _batches(3, seed=12), record)
        grads.append((record, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (plain, weights), (decayed, _) = grads
    for step, (a, b) in enumerate(zip(plain, decayed)):
        for name in a:
            torch.testing.assert_close(b[name], a[name] + 0.3 * weights[name], rtol=1e-12, atol=1e-14,
                                       msg=f"step {step} {name}")


def test_bad_options_are_refused():
    model = nn.Linear(2, 2)
    adam = dict(rule="adam")
    for kwargs, match in ((dict(rule="sgd"), "rule must be"), (dict(power=0.4, **adam), "power must be"),
                          (dict(power=1.5, **adam), "power must be"), (dict(beta1=1.0, **adam), "beta1 must be"),
                          (dict(beta2=-0.1, **adam), "beta2 must be"), (dict(eps=0, **adam), "eps must be"),
                          (dict(relative_eps=-0.1, **adam), "relative_eps must be"),
                          (dict(relative_eps=float("inf"), **adam), "relative_eps must be"),
                          (dict(weight_decay=-1), "weight_decay must be"),
                          (dict(factor_ema=1), "factor_ema must be"),
                          (dict(eigh_every=0), "eigh_every must be"), (dict(burn_in=-1), "burn_in must be"),
                          (dict(burn_in=1.5), "burn_in must be"),
                          (dict(first_basis=-1, **adam), "first_basis must be"),
                          (dict(first_basis=2), "first_basis belong.*rule='adam'"),
                          (dict(first_basis=2, rule="adam", moment="paper"), "needs rule='adam' with moment='adam'"),
                          (dict(first_basis=2, rule="adam", loss_reduction="sum"), "first_basis needs loss_reduction='mean'"),
                          (dict(first_basis=2, first_moments="reset", **adam), "first_moments must be one of"),
                          (dict(first_moments="restart", **adam), "add first_basis=D"),
                          (dict(first_moments="restart", first_basis=2), "first_moments belong.*rule='adam'"),
                          (dict(bias_correction="yes", **adam), "bias_correction"),
                          (dict(rule="adam", moment="kfac"), "moment must be"), (dict(moment="adam"), "moment must be")):
        with pytest.raises(ValueError, match=match):
            snopt_dyn.SNOpt(model, **kwargs)
    assert snopt_dyn.SNOpt(model, rule="adam").moment == "adam"
    assert snopt_dyn.SNOpt(model).moment == "paper"


def test_a_rule_override_drops_the_defaults_adam_only_options():
    """The timeseries task (and the Neural CDE estimators) run rule='adam' with first_basis=10;
    asking for the paper's rule (``snopt[rule=ekfac]``, as the README does) must build today's rule
    with the task's other settings, not be refused for the task's first_basis.  An Adam-only option
    given together with the other rule is still refused."""
    from snopt_dyn.compare import compare
    from snopt_dyn.compare.optimizers import parse_optimizer
    from snopt_dyn.compare.tasks import get_task
    from snopt_dyn.estimators import NeuralCDEClassifier, training

    task = get_task("timeseries")
    assert task.snopt["first_basis"] == 10 and task.snopt["first_moments"] == "restart"
    assert parse_optimizer("snopt[rule=ekfac]@0.02", task.snopt) == ("snopt", 0.02)
    with pytest.raises(ValueError, match="first_basis belong.*rule='adam'"):
        parse_optimizer("snopt[rule=ekfac;first_basis=3]", task.snopt)
    with pytest.raises(ValueError, match="add first_basis=D"):  # restart without first_basis, asked for
        parse_optimizer("snopt[first_basis=0;first_moments=restart]", task.snopt)
    small = task.prepare("cpu", max_train=8, max_test=8)
    result = compare(small, ["snopt", "snopt[rule=ekfac]@0.02", "snopt[first_basis=0]"], iters=2, eval_points=1,
                     progress=False)
    adam, paper, from_zero = (run.precond for run in result.runs)
    assert (adam.rule, adam.first_basis, adam.first_moments) == ("adam", 10, "restart")
    assert (paper.rule, paper.first_basis, paper.update_freq) == ("ekfac", 0, task.snopt["update_freq"])
    assert (from_zero.rule, from_zero.first_basis, from_zero.first_moments) == ("adam", 0, "carry")
    assert adam.sampling_nfe == 0 and from_zero.sampling_nfe > 0  # 2 iterations: no basis yet / one
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    _, precond = training.make_optimizer("snopt", model, 0.02, {"rule": "ekfac"}, NeuralCDEClassifier._snopt_defaults)
    assert (precond.rule, precond.first_basis, precond.update_freq) == ("ekfac", 0, 20)
    precond.remove()


def test_cli_specs_reach_snopt():
    """snopt[rule=adam;power=..;beta1=..;beta2=..;wd=..;factor_ema=..;burn_in=..;eigh_every=..]@LR:
    parsed, checked before any run, passed to SNOpt; bad values are refused with the option's name."""
    from snopt_dyn.compare import compare
    from snopt_dyn.compare.optimizers import parse_optimizer, snopt_overrides, split_snopt_options
    from snopt_dyn.compare.tasks import get_task
    spec = "snopt[rule=adam;power=0.5;beta1=0.95;beta2=0.95;wd=0.01;factor_ema=0.9;burn_in=1;eigh_every=2]@3e-3"
    assert parse_optimizer(spec) == ("snopt", 3e-3)
    options, base = split_snopt_options(snopt_overrides(spec))
    assert options == dict(rule="adam", power=0.5, beta1=0.95, beta2=0.95, weight_decay=0.01, factor_ema=0.9,
                           burn_in=1, eigh_every=2) and base == {}
    for bad, match in (("snopt[rule=lion]", "rule"), ("snopt[rule=adam;power=2]", "power must be"),
                       ("snopt[rule=adam;beta1=1]", "beta1 must be"),
                       ("snopt[wd=-1]", "weight_decay"), ("snopt[burn_in=x]", "burn_in"),
                       ("snopt[wd=1;weight_decay=1]", "twice"), ("snopt[rho=1]", "no option 'rho'"),
                       ("snopt[momentum=fast]", "momentum")):
        with pytest.raises(ValueError, match=match):
            parse_optimizer(bad)
    with pytest.raises(ValueError, match="belong.*rule='adam'"):  # on a task that runs the paper's rule
        parse_optimizer("snopt[power=1]", get_task("image").snopt)
    with pytest.raises(ValueError, match="first_basis belong.*rule='adam'"):  # the same for first_basis
        parse_optimizer("snopt[first_basis=3]", get_task("image").snopt)
    task = get_task("image", "digits").prepare("cpu", max_train=16, max_test=24)
    result = compare(task, ["snopt", spec], iters=3, eval_points=1, progress=False)
    plain, variant = result.runs
    assert plain.precond.rule == "ekfac" and plain.precond.weight_decay == 0
    p = variant.precond
    assert (p.rule, p.power, p.beta1, p.beta2, p.weight_decay, p.factor_ema, p.burn_in, p.eigh_every) == \
        ("adam", 0.5, 0.95, 0.95, 0.01, 0.9, 1, 2)
    assert variant.lr == 3e-3 and variant.optimizer.param_groups[0]["momentum"] == 0


def test_adam_options_without_the_adam_rule_and_a_mismatched_state_are_refused():
    """An Adam-only option given to today's rule would silently do nothing: refused, naming the fix;
    a state_dict saved under one rule does not load into SNOpt with the other."""
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="power belong.*rule='adam'"):
        snopt_dyn.SNOpt(model, power=1)
    with pytest.raises(ValueError, match="relative_eps belong.*rule='adam'"):
        snopt_dyn.SNOpt(model, relative_eps=0.1)
    snopt_dyn.SNOpt(model, beta1=0.9, power=0.5).remove()  # defaults are fine
    state = snopt_dyn.SNOpt(model, rule="adam").state_dict()
    with pytest.raises(ValueError, match="rule='adam'"):
        snopt_dyn.SNOpt(model).load_state_dict(state)


# ------------------------------------------------------------------------ 8. the scale-free ε
def _first_updates(monkeypatch, scale, **kwargs):
    """``.grad`` of ``l1.weight`` after SNOpt's first step on identity bases, for ``scale`` x the
    loss, on data whose last input feature is 1e-6 x the others (its weights get almost no gradient)."""
    monkeypatch.setattr(ekfac, "eigh", FakeEigh("identity"))
    torch.manual_seed(0)
    model = MLP().double()
    x, y = _batches(1)[0]
    x = x * torch.tensor([1.0, 1.0, 1.0, 1e-6], dtype=DT)
    precond = snopt_dyn.SNOpt(model, rule="adam", update_freq=1, **kwargs)
    (scale * F.mse_loss(model(x), y)).backward()
    precond.step()
    return model.l1.weight.grad.clone()


def test_relative_eps_damps_the_directions_without_gradient_and_stays_scale_free(monkeypatch):
    """Adam's first step is ``±1`` per coordinate, also where the gradient is ~1e-6 of the rest (a
    direction of input space the batch never visits).  ``relative_eps`` shrinks exactly those
    coordinates, and, unlike an absolute ε that does the same at one loss scale, it gives the same
    update for the loss and 1e6 x the loss."""
    eps = 1e-30  # Adam's ε out of the way: the plain rule is scale-free too
    plain = _first_updates(monkeypatch, 1.0, eps=eps)
    damped = _first_updates(monkeypatch, 1.0, eps=eps, relative_eps=0.1)
    strong, weak = slice(0, 3), 3  # l1.weight's columns: the three real input features, then the tiny one
    torch.testing.assert_close(plain.abs(), torch.ones_like(plain), rtol=1e-9, atol=0)
    assert damped[:, weak].abs().max() < 1e-4  # ~1e-6 / 0.1 of a step
    assert damped[:, strong].abs().min() > 0.3  # the directions with gradient keep most of theirs (0.44-0.97 here)
    torch.testing.assert_close(_first_updates(monkeypatch, 1e6, eps=eps, relative_eps=0.1), damped,
                               rtol=1e-9, atol=0)
    # an absolute ε tuned to damp the weak column at scale 1 loses it at scale 1e6
    absolute = [_first_updates(monkeypatch, c, eps=1e-4) for c in (1.0, 1e6)]
    assert absolute[0][:, strong].abs().min() > 0.5 and absolute[0][:, weak].abs().max() < 0.1
    assert absolute[1][:, weak].abs().min() > 0.5
