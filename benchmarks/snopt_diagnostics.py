"""Three measurements behind BENCHMARKS.md's prose, as commands.

``steps``: the length of SNOpt's preconditioned step per iteration on a task (``|P g| / |g|``, and
``lr² ⟨P g, g⟩``, the KL clip's quantity), marking refreshes: where long steps happen.

``phases``: two twins of a task's model (same seed, same warm-up), one with SNOpt attached and never
refreshing, timed by phase (forward, backward, ``step()``) over interleaved rounds: whether SNOpt
costs anything outside its own ``step()``.

``weak``: SNOpt's first step under the task's rule, per layer: the share of the update's squared
norm that lands on coordinates of the Kronecker eigenbasis whose gradient is below ``δ`` times the
layer's mean (δ = 0.1, 1), against the share of the gradient's own energy there; and how many entries
are that weak in the weights' own basis.  Adam's first step is ``±lr`` per coordinate in either basis.

    python benchmarks/snopt_diagnostics.py steps timeseries 45
    python benchmarks/snopt_diagnostics.py phases flow 15
    python benchmarks/snopt_diagnostics.py weak timeseries 0    # the last number is the seed
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

import snopt_dyn
from snopt_dyn.compare import get_task
from snopt_dyn.compare.optimizers import split_snopt_options
from snopt_dyn.layers import kind_of


def _setup(name: str):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    task = get_task(name).prepare("cpu", max_test=1)
    options, _ = split_snopt_options(task.snopt)
    return task, options


def steps(name: str, iterations: int) -> None:
    task, options = _setup(name)
    model = task.make_model(0)
    precond = snopt_dyn.SNOpt(model, **options)
    lr = task.lrs["snopt"]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for it in range(iterations):
        index = torch.randint(0, task.n_train, (task.batch_size,), generator=gen)
        opt.zero_grad()
        loss = task.loss(model, index)
        loss.backward()
        raw = [p.grad.clone() for p in model.parameters()]
        refresh = precond.refreshing
        precond.step()
        new = [p.grad for p in model.parameters()]
        g, pg = (sum(float(t.norm() ** 2) for t in ts) ** 0.5 for ts in (raw, new))
        kl = lr ** 2 * sum(float((a * b).sum()) for a, b in zip(raw, new))
        opt.step()
        print(f"{it:4d} {'R' if refresh else ' '} loss {float(loss):.3f} |g| {g:.3f} |Pg| {pg:.2f} "
              f"|Pg|/|g| {pg / g:.1f} lr²<Pg,g> {kl:.2e}")


def phases(name: str, rounds: int) -> None:
    task, options = _setup(name)
    options.pop("update_freq", None)
    index = torch.arange(task.batch_size)
    twins = [task.make_model(0) for _ in range(2)]
    precond = snopt_dyn.SNOpt(twins[1], update_freq=10 ** 9, **options)

    def iteration(model, p):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = task.loss(model, index)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if p is not None:
            p.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    iteration(twins[0], None), iteration(twins[1], precond)  # equal warm-up (SNOpt's refresh)
    times = {0: [], 1: []}
    for _ in range(rounds):
        for k in (0, 1):
            times[k].append(iteration(twins[k], precond if k else None))
    for k, label in ((0, "without SNOpt"), (1, "with SNOpt  ")):
        fwd, bwd, stp = (1e3 * statistics.median(t[i] for t in times[k]) for i in range(3))
        print(f"{label}: forward {fwd:.1f} ms, backward {bwd:.1f} ms, step() {stp:.1f} ms")
    total = [sum(statistics.median(t[i] for t in times[k]) for i in range(3)) for k in (0, 1)]
    print(f"ratio with/without: x{total[1] / total[0]:.3f}")


def _share_below(scale: torch.Tensor, energy: torch.Tensor, delta: float):
    """``(fraction of coordinates, share of energy)`` where ``scale < delta·mean(scale)``."""
    weak = scale < delta * scale.mean()
    return float(weak.float().mean()), float(energy[weak].sum() / energy.sum())


def weak(name: str, seed: int) -> None:
    task, options = _setup(name)
    model = task.make_model(seed)
    precond = snopt_dyn.SNOpt(model, **options)
    index = torch.randperm(task.n_train, generator=torch.Generator().manual_seed(seed))[:task.batch_size]
    task.loss(model, index).backward()
    layers = {n: (m, kind_of(m)[0]) for n, m in model.named_modules() if n in precond.layers()}
    raw = {n: kind.grad_matrix(m).clone() for n, (m, kind) in layers.items()}
    precond.step()
    for n, (a, g, _) in precond.factors().items():
        u_a, u_g = torch.linalg.eigh(a)[1], torch.linalg.eigh(g)[1]
        m, kind = layers[n]
        update = kind.grad_matrix(m)
        grad_in, update_in = (u_g.t() @ x @ u_a for x in (raw[n], update))
        for delta in (0.1, 1.0):
            frac, grad_share = _share_below(grad_in.abs(), grad_in.pow(2), delta)
            _, update_share = _share_below(grad_in.abs(), update_in.pow(2), delta)
            own, _ = _share_below(raw[n].abs(), raw[n].pow(2), delta)
            print(f"{n:14s} |g| < {delta:g}·mean: eigenbasis {frac:.0%} of coordinates, {update_share:.0%} of "
                  f"the update, {grad_share:.2%} of the gradient; own basis {own:.0%} of the entries")


if __name__ == "__main__":
    what, task_name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"steps": steps, "phases": phases, "weak": weak}[what](task_name, count)
