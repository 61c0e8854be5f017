"""The interleaved optimizer comparison behind ``snopt-dyn compare``.

Why interleaved: the speed of a shared machine drifts (up to 1.6x between identical runs here), so
running SNOpt, Adam and SGD one after the other measures the machine, not the optimizers.  Here
every optimizer has its own model (same initial weights), its own optimizer, its own data order
(the same permutation for all) and its own clock, and they take turns **one iteration at a time**
in one process.  Only training iterations (forward, backward, ``precond.step()``,
``optimizer.step()``) run on the clock; evaluation on the test set is excluded.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import snopt_dyn
from snopt_dyn.preconditioner import layer_options
from .optimizers import (OPTIMIZER_HELP, OPTIMIZER_NAMES, lr_multiplier, make_optimizer, make_snopt_base,
                         parse_optimizer, set_lr, snopt_overrides, split_snopt_options)
from .progress import progress_bar, status
from .results import CompareResult, Run
from .tasks.base import Task

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(task: Task, optimizers: Sequence[str], *, budget: Optional[float] = None,
            iters: Optional[int] = None, seed: int = 0, batch_size: Optional[int] = None,
            lrs: Optional[Dict[str, float]] = None, snopt_options: Optional[Dict[str, float]] = None,
            eval_points: Optional[int] = None, progress: bool = True) -> CompareResult:
    """Train ``task`` once per optimizer, interleaved one iteration at a time.

    Args:
        task: a prepared task (:meth:`snopt_dyn.compare.Task.prepare`).
        optimizers: names from :data:`snopt_dyn.compare.OPTIMIZER_NAMES`, or ``"name@lr"`` to set the
            learning rate of that run (several runs of one optimizer make a learning-rate sweep).
        budget: training-clock seconds per optimizer; or ``iters`` iterations per optimizer
            (exactly one of them; neither means the task's default budget).
        seed: model initialisation and data order (identical for every optimizer).
        batch_size, lrs, snopt_options: override the task's defaults.
        eval_points: test evaluations per run (every ``budget/eval_points`` seconds of training
            clock, or every ``iters/eval_points`` iterations), plus one before training and one at
            the end; default: the task's.
        progress: show a tqdm bar on stderr.
    """
    budget, eval_points = _check_limits(task, budget, iters, eval_points)
    snopt_kwargs = layer_options(task.snopt, snopt_options)
    specs = _check_optimizers(optimizers, snopt_kwargs)
    missing = [n for n, (kind, lr) in specs.items() if lr is None and kind not in {**task.lrs, **(lrs or {})}]
    if missing:
        raise ValueError(f"task {task.name!r} has no default learning rate for {', '.join(missing)}; "
                         f"give one as NAME@LR (e.g. {missing[0]}@1e-3) or in lrs=")
    batch_size = batch_size or task.batch_size
    lrs = {**task.lrs, **(lrs or {})}
    notes: List[str] = []
    runs = [_make_run(task, name, kind, float(lrs[kind] if lr is None else lr), seed, batch_size, snopt_kwargs, notes)
            for name, (kind, lr) in specs.items()]
    _check_identical_weights(runs)
    schedule = _Schedule(budget, iters, budget / eval_points if budget is not None else None,
                         max(1, math.ceil(iters / eval_points)) if iters is not None else None)
    settings = dict(task=task.name, description=task.description, data=task.data,
                    optimizers=list(specs), budget_s=budget, iters=iters, seed=seed,
                    batch_size=batch_size, device=str(task.device), lrs={r.name: r.lr for r in runs},
                    snopt=snopt_kwargs if any(r.kind == "snopt" for r in runs) else None, eval_points=eval_points,
                    eval_every_s=schedule.every_s, eval_every_iters=schedule.every_it,
                    metric=task.metric, n_train=task.info.get("n_train"), n_test=task.info.get("n_test"),
                    base_optimizers={r.name: OPTIMIZER_HELP[r.kind] for r in runs},
                    threads=torch.get_num_threads())
    result = CompareResult(task=task, runs=runs, settings=settings, notes=notes)
    start = time.perf_counter()
    _interleave(result, schedule, progress)
    result.wall_s = time.perf_counter() - start
    return result


def compare_seeds(task: Task, optimizers: Sequence[str], seeds: Sequence[int], **kwargs) -> List[CompareResult]:
    """:func:`compare` once per seed (each seed's optimizers interleaved); stops early on Ctrl-C."""
    if not seeds:
        raise ValueError("give at least one seed")
    results: List[CompareResult] = []
    for seed in seeds:
        results.append(compare(task, optimizers, seed=seed, **kwargs))
        if results[-1].interrupted:
            break
    return results


@dataclass(frozen=True)
class _Schedule:
    """When runs stop (``budget`` seconds or ``iters``) and when they are evaluated."""

    budget: Optional[float]
    iters: Optional[int]
    every_s: Optional[float]
    every_it: Optional[int]


def _check_limits(task: Task, budget, iters, eval_points):
    if budget is not None and iters is not None:
        raise ValueError("give budget or iters, not both")
    if budget is None and iters is None:
        budget = task.budget
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"budget must be a positive number of seconds, got {budget}")
    if iters is not None and iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters}")
    eval_points = task.eval_points if eval_points is None else eval_points
    if eval_points < 1:
        raise ValueError(f"eval_points must be at least 1, got {eval_points}")
    return budget, eval_points


def _check_optimizers(optimizers: Sequence[str], task_snopt: dict) -> Dict[str, tuple]:
    """``{run name: (kind, lr or None)}`` in the given order; raises ``ValueError`` on bad names or
    on SNOpt options that do not fit the task's (``task_snopt``)."""
    if not optimizers:
        raise ValueError(f"no optimizer given; choose from {', '.join(OPTIMIZER_NAMES)}")
    names = [o.strip().lower() for o in optimizers]
    if len(set(names)) != len(names):
        raise ValueError(f"optimizers listed twice: {list(names)}")
    return {name: parse_optimizer(name, task_snopt) for name in names}


def _make_run(task: Task, name: str, kind: str, lr: float, seed: int, batch_size: int, snopt_kwargs: dict,
              notes: List[str]) -> Run:
    model = task.make_model(seed)
    precond, schedule = None, "constant"
    if kind == "snopt":
        precond, optimizer, schedule = _make_snopt(task, model, name, lr, snopt_kwargs, notes)
    else:
        optimizer = make_optimizer(kind, model, lr)
    return Run(name=name, kind=kind, lr=lr, model=model, optimizer=optimizer, precond=precond,
               generator=torch.Generator().manual_seed(seed), batch_size=batch_size, n_train=task.n_train,
               lr_schedule=lr_multiplier(kind, schedule), seed=seed,
               _base_lrs={id(g): g["lr"] for g in optimizer.param_groups})


def _make_snopt(task: Task, model: nn.Module, name: str, lr: float, snopt_kwargs: dict, notes: List[str]):
    """SNOpt, its base optimizer and schedule; the KL clip (if any) reads the base SGD's current rate."""
    options, base = split_snopt_options(layer_options(snopt_kwargs, snopt_overrides(name)))
    holder: List[torch.optim.Optimizer] = []
    if options.get("kl_clip") is not None:
        options["lr"] = lambda step: holder[0].param_groups[0]["lr"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precond = snopt_dyn.SNOpt(model, **options)
    notes += [str(w.message) for w in caught]
    schedule = base.pop("schedule", "constant")
    if base.get("rest") == "adam":
        base.setdefault("rest_lr", task.lrs["adam"])
    holder.append(make_snopt_base(precond, lr, **base))
    return precond, holder[0], schedule


def _check_identical_weights(runs: List[Run]) -> None:
    """Identical initial weights, by construction; checked because the comparison relies on it."""
    first = runs[0].model.state_dict()
    for run in runs[1:]:
        for key, value in run.model.state_dict().items():
            if not torch.equal(value, first[key]):
                raise RuntimeError(f"internal error: initial weights differ between runs ({key})")


def _interleave(result: CompareResult, schedule: _Schedule, progress: bool) -> None:
    """The runs take turns one iteration at a time until every one is done (or Ctrl-C)."""
    task, runs = result.task, result.runs
    bar = progress_bar(progress, runs, schedule.budget, schedule.iters, seed=runs[0].seed)
    try:
        for run in runs:  # evaluation before training, off the clock
            _record_eval(task, run, loss=None, nfe=(0, 0, 0))
            run.next_eval = schedule.every_s if schedule.every_s is not None else schedule.every_it
        turn = 0
        while not all(r.done for r in runs):
            # rotate who goes first each round, so no optimizer always follows the same one
            order = runs[turn % len(runs):] + runs[:turn % len(runs)]
            turn += 1
            for run in order:
                if not run.done:
                    before = run.clock
                    _train_iteration(task, run, task.device, schedule)
                    _advance(bar, runs, task, run, before, schedule.budget)
    except KeyboardInterrupt:
        result.interrupted = True
        for run in runs:
            if not run.done and run.rows and run.rows[-1]["test_metric"] is None:
                _evaluate_last(task, run)
    finally:
        if bar is not None:
            bar.close()
        for run in runs:  # detach the preconditioners from the engine (their counters stay readable)
            if run.precond is not None:
                run.precond.remove()


def _advance(bar, runs: List[Run], task: Task, run: Run, before: float, budget: Optional[float]) -> None:
    if bar is not None:
        bar.update((min(run.clock, budget) - min(before, budget)) if budget is not None else 1)
        bar.set_description_str(status(runs, task), refresh=False)


def _train_iteration(task: Task, run: Run, device, schedule: _Schedule) -> None:
    budget, iters, eval_every_s, eval_every_it = schedule.budget, schedule.iters, schedule.every_s, schedule.every_it
    index = run.next_batch().to(device)
    counter = snopt_dyn.nfe
    f0, b0 = counter.forward, counter.backward
    s0 = run.precond.sampling_nfe if run.precond is not None else 0
    loss_value = float("nan")
    error = None
    _sync(device)
    tic = time.perf_counter()
    try:
        if run.lr_schedule is not None:  # before precond.step(): its KL clip reads the current rate
            spent = run.clock / budget if budget is not None else run.iters / iters
            set_lr(run.optimizer, run._base_lrs, run.lr_schedule(spent))
        run.optimizer.zero_grad(set_to_none=True)
        loss = task.loss(run.model, index)
        loss.backward()
        if run.precond is not None:
            run.precond.step()
        loss_value = float(loss.detach())
        if math.isfinite(loss_value):
            run.optimizer.step()
        _sync(device)
    except _DIVERGED as exc:  # this run diverged or its solver gave up: stop it, keep the others
        error = exc
    run.clock += time.perf_counter() - tic
    run.iters += 1
    nfe = (counter.forward - f0, counter.backward - b0,
           (run.precond.sampling_nfe - s0) if run.precond is not None else 0)
    run.nfe_forward += nfe[0]
    run.nfe_backward += nfe[1]
    run.sampling_nfe += nfe[2]
    if error is not None or not math.isfinite(loss_value):
        run.status = f"stopped at iteration {run.iters}: " + (
            _short(error) if error is not None else "the loss is not finite (diverged)")
        run.done = True
    elif budget is not None and run.clock >= budget:
        run.done = True
    elif iters is not None and run.iters >= iters:
        run.done = True
    due = run.done
    if eval_every_s is not None and run.clock >= run.next_eval:
        due = True
        while run.next_eval <= run.clock:
            run.next_eval += eval_every_s
    if eval_every_it is not None and run.iters >= run.next_eval:
        due = True
        run.next_eval += eval_every_it
    if due:
        _record_eval(task, run, loss_value, nfe)
    else:
        run.rows.append(_row(run, loss_value, None, nfe))


# What a diverging run raises: the engine's errors, torchdiffeq's "non-finite values in state"
# assertion, torch runtime errors.  The run stops with the message in its status; the others go on.
_DIVERGED = (snopt_dyn.SolverError, snopt_dyn.NonFiniteError, FloatingPointError, AssertionError, RuntimeError)


def _row(run: Run, loss: Optional[float], metric: Optional[float], nfe) -> dict:
    return dict(optimizer=run.name, iteration=run.iters, train_clock_s=run.clock, train_loss=loss,
                test_metric=metric, nfe_forward=nfe[0], nfe_backward=nfe[1], sampling_nfe=nfe[2])


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    return f"{type(exc).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _safe_evaluate(task: Task, run: Run) -> Optional[float]:
    """The test metric (off the clock), or ``None`` when the model can no longer be evaluated."""
    if run.status != "ok":
        return None
    try:
        return task.evaluate(run.model)
    except _DIVERGED as exc:
        run.status = f"stopped at iteration {run.iters}: evaluation failed: {_short(exc)}"
        run.done = True
        return None


def _record_eval(task: Task, run: Run, loss, nfe) -> None:
    run.rows.append(_row(run, loss, _safe_evaluate(task, run), nfe))


def _evaluate_last(task: Task, run: Run) -> None:
    run.rows[-1]["test_metric"] = _safe_evaluate(task, run)
