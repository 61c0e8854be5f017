"""The interleaved optimizer comparison behind ``snopt-dyn compare``.

Why interleaved: the speed of a shared machine drifts (up to 1.6x between identical runs here), so
running SNOpt, Adam and SGD one after the other measures the machine, not the optimizers.  Here
every optimizer has its own model (same initial weights), its own optimizer, its own data order
(the same permutation for all) and its own clock, and they take turns **one iteration at a time**
in one process.  Only training iterations (forward, backward, ``precond.step()``,
``optimizer.step()``) run on the clock; evaluation on the test set is excluded.

Use from Python::

    from snopt_dyn.compare import compare, summarize, format_table
    from snopt_dyn.tasks import get_task
    result = compare(get_task("timeseries").prepare("cpu"), ["snopt", "adam", "sgd"], budget=30)
    print(format_table(result, summarize(result)))
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import snopt_dyn
from .tasks import FIRST_ORDER, OPTIMIZER_HELP, OPTIMIZER_NAMES, Task

__all__ = ["Run", "CompareResult", "compare", "parse_optimizer", "summarize", "choose_target", "format_table",
           "write_outputs", "plot_curves", "import_pyplot", "check_output_dir", "machine_info", "CSV_COLUMNS"]

CSV_COLUMNS = ("optimizer", "iteration", "train_clock_s", "train_loss", "test_metric",
               "nfe_forward", "nfe_backward", "sampling_nfe")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    """One optimizer's training run: model, optimizer, data order, clock and raw curve."""

    name: str           # the label: the optimizer's name, or "name@lr" in a learning-rate sweep
    kind: str           # one of OPTIMIZER_NAMES
    lr: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    precond: Optional[snopt_dyn.SNOpt]
    generator: torch.Generator
    batch_size: int
    n_train: int
    clock: float = 0.0
    iters: int = 0
    nfe_forward: int = 0
    nfe_backward: int = 0
    sampling_nfe: int = 0
    status: str = "ok"
    done: bool = False
    next_eval: float = 0.0
    rows: List[dict] = field(default_factory=list)
    _order: Optional[torch.Tensor] = None
    _pos: int = 0

    def next_batch(self) -> torch.Tensor:
        """Indices of the next batch: epochs of a seeded permutation, last partial batch dropped."""
        size = min(self.batch_size, self.n_train)
        if self._order is None or self._pos + size > len(self._order):
            self._order = torch.randperm(self.n_train, generator=self.generator)
            self._pos = 0
        index = self._order[self._pos:self._pos + size]
        self._pos += size
        return index

    @property
    def evals(self) -> List[dict]:
        return [r for r in self.rows if r["test_metric"] is not None]


@dataclass
class CompareResult:
    """Everything a comparison produced: its settings and the runs (with their raw curves)."""

    task: Task
    runs: List[Run]
    settings: Dict[str, object]
    wall_s: float = 0.0
    interrupted: bool = False
    notes: List[str] = field(default_factory=list)


def parse_optimizer(spec: str):
    """``"adam"`` → ``("adam", None)``; ``"adam@1e-3"`` → ``("adam", 0.001)``; raises ``ValueError``."""
    kind, sep, lr = spec.strip().lower().partition("@")
    if kind not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
    if not sep:
        return kind, None
    try:
        value = float(lr)
    except ValueError:
        raise ValueError(f"bad learning rate in {spec!r}; write NAME@LR, e.g. adam@1e-3") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"learning rates must be positive, got {spec!r}")
    return kind, value


def _make_optimizer(name: str, model: nn.Module, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name in ("sgd-plain", "snopt"):
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZER_NAMES)}")


def compare(task: Task, optimizers: Sequence[str], *, budget: Optional[float] = None,
            iters: Optional[int] = None, seed: int = 0, batch_size: Optional[int] = None,
            lrs: Optional[Dict[str, float]] = None, snopt_options: Optional[Dict[str, float]] = None,
            eval_points: Optional[int] = None, progress: bool = True) -> CompareResult:
    """Train ``task`` once per optimizer, interleaved one iteration at a time.

    Args:
        task: a prepared task (:meth:`snopt_dyn.tasks.Task.prepare`).
        optimizers: names from :data:`snopt_dyn.tasks.OPTIMIZER_NAMES`, or ``"name@lr"`` to set the
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
    if not optimizers:
        raise ValueError(f"no optimizer given; choose from {', '.join(OPTIMIZER_NAMES)}")
    specs = [parse_optimizer(o) for o in optimizers]
    optimizers = [o.strip().lower() for o in optimizers]
    if len(set(optimizers)) != len(optimizers):
        raise ValueError(f"optimizers listed twice: {list(optimizers)}")
    batch_size = batch_size or task.batch_size
    lrs = {**task.lrs, **(lrs or {})}
    snopt_kwargs = {**task.snopt, **(snopt_options or {})}
    device = task.device
    notes: List[str] = []

    runs: List[Run] = []
    for name, (kind, lr) in zip(optimizers, specs):
        lr = float(lrs[kind] if lr is None else lr)
        model = task.make_model(seed)
        precond = None
        if kind == "snopt":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                precond = snopt_dyn.SNOpt(model, **snopt_kwargs)
            notes += [str(w.message) for w in caught]
        runs.append(Run(name=name, kind=kind, lr=lr, model=model,
                        optimizer=_make_optimizer(kind, model, lr), precond=precond,
                        generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
                        n_train=task.n_train))
    # identical initial weights, by construction; checked because the comparison relies on it
    first = runs[0].model.state_dict()
    for run in runs[1:]:
        for key, value in run.model.state_dict().items():
            if not torch.equal(value, first[key]):
                raise RuntimeError(f"internal error: initial weights differ between runs ({key})")

    eval_every_s = budget / eval_points if budget is not None else None
    eval_every_it = max(1, math.ceil(iters / eval_points)) if iters is not None else None
    settings = dict(task=task.name, description=task.description, data=task.data,
                    optimizers=list(optimizers), budget_s=budget, iters=iters, seed=seed,
                    batch_size=batch_size, device=str(device), lrs={r.name: r.lr for r in runs},
                    snopt=snopt_kwargs if any(k == "snopt" for k, _ in specs) else None, eval_points=eval_points,
                    eval_every_s=eval_every_s, eval_every_iters=eval_every_it,
                    metric=task.metric, n_train=task.info.get("n_train"), n_test=task.info.get("n_test"),
                    base_optimizers={r.name: OPTIMIZER_HELP[r.kind] for r in runs},
                    threads=torch.get_num_threads())
    result = CompareResult(task=task, runs=runs, settings=settings, notes=notes)

    bar = _progress_bar(progress, runs, budget, iters)
    start = time.perf_counter()
    try:
        for run in runs:  # evaluation before training, off the clock
            _record_eval(task, run, loss=None, nfe=(0, 0, 0))
            run.next_eval = eval_every_s if eval_every_s is not None else eval_every_it
        turn = 0
        while not all(r.done for r in runs):
            # rotate who goes first each round, so no optimizer always follows the same one
            order = runs[turn % len(runs):] + runs[:turn % len(runs)]
            turn += 1
            for run in order:
                if run.done:
                    continue
                before = run.clock
                _train_iteration(task, run, device, budget, iters, eval_every_s, eval_every_it)
                if bar is not None:
                    bar.update((min(run.clock, budget) - min(before, budget)) if budget is not None else 1)
                    bar.set_postfix_str(_postfix(runs, task), refresh=False)
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
    result.wall_s = time.perf_counter() - start
    return result


def _train_iteration(task: Task, run: Run, device, budget, iters, eval_every_s, eval_every_it) -> None:
    index = run.next_batch().to(device)
    counter = snopt_dyn.nfe
    f0, b0 = counter.forward, counter.backward
    s0 = run.precond.sampling_nfe if run.precond is not None else 0
    loss_value = float("nan")
    error = None
    _sync(device)
    tic = time.perf_counter()
    try:
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


def _postfix(runs: List[Run], task: Task) -> str:
    parts = []
    for run in runs:
        evals = run.evals
        if evals:
            parts.append(f"{run.name} {_fmt_metric(evals[-1]['test_metric'], task)}")
    return " ".join(parts)


def _progress_bar(enabled: bool, runs: List[Run], budget, iters):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar then
        return None
    names = "/".join(r.name for r in runs)
    if budget is not None:
        return tqdm(total=budget * len(runs), unit="s", desc=f"training {names}", file=sys.stderr,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} train-s "
                               "[{elapsed}<{remaining}] {postfix}", dynamic_ncols=True)
    return tqdm(total=iters * len(runs), unit="it", desc=f"training {names}", file=sys.stderr,
                dynamic_ncols=True)


# --------------------------------------------------------------------------------------- summary
def _fmt_metric(value: Optional[float], task: Task) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%" if task.metric == "accuracy" else f"{value:.4f}"


def _reached(value: float, target: float, higher: bool) -> bool:
    # a small tolerance: accuracies are fractions of a finite test set (k / n), so compare counts
    return value >= target - 1e-9 if higher else value <= target + 1e-9


def choose_target(result: CompareResult, target: Optional[float] = None):
    """The target metric and where it came from: ``target`` if given, else the best *final*
    metric of the first-order methods in the comparison (``None`` when there are none)."""
    if target is not None:
        return float(target), "given with --target"
    higher = result.task.higher_is_better
    finals = [r.evals[-1]["test_metric"] for r in result.runs if r.kind in FIRST_ORDER and r.evals]
    if not finals:
        return None, "no first-order method in the comparison and no --target"
    best = max(finals) if higher else min(finals)
    return best, "best final test metric of the first-order methods"


def summarize(result: CompareResult, target: Optional[float] = None) -> dict:
    """The table's numbers: per optimizer, and the SNOpt / best-first-order time-to-target ratio."""
    higher = result.task.higher_is_better
    target, target_source = choose_target(result, target)
    rows = []
    for run in result.runs:
        evals = run.evals
        metrics = [e["test_metric"] for e in evals]
        hit = None
        if target is not None:
            hit = next((e for e in evals if _reached(e["test_metric"], target, higher)), None)
        iters = max(run.iters, 1)
        # single evaluations are noisy: also report the mean over the last third of the run's clock
        late = [e["test_metric"] for e in evals[1:] if e["train_clock_s"] >= 2 * run.clock / 3]
        rows.append(dict(
            optimizer=run.name, kind=run.kind, lr=run.lr, iterations=run.iters, train_clock_s=run.clock,
            final_metric=metrics[-1] if metrics else None,
            best_metric=(max(metrics) if higher else min(metrics)) if metrics else None,
            late_mean_metric=sum(late) / len(late) if late else None,
            time_to_target_s=hit["train_clock_s"] if hit else None,
            iterations_to_target=hit["iteration"] if hit else None,
            iters_per_s=run.iters / run.clock if run.clock > 0 else None,
            nfe_per_iter=(run.nfe_forward + run.nfe_backward) / iters,
            nfe_forward_per_iter=run.nfe_forward / iters,
            nfe_backward_per_iter=run.nfe_backward / iters,
            sampling_nfe_per_iter=run.sampling_nfe / iters if run.precond is not None else None,
            sampling_nfe_total=run.sampling_nfe if run.precond is not None else None,
            refreshes=run.precond.refreshes if run.precond is not None else None,
            precond_time_s=run.precond.total_step_time if run.precond is not None else None,
            status=run.status))
    ratio, best_fo = None, None
    reached = [r for r in rows if r["kind"] == "snopt" and r["time_to_target_s"] is not None]
    snopt = min(reached, key=lambda r: r["time_to_target_s"]) if reached else \
        next((r for r in rows if r["kind"] == "snopt"), None)
    fo = [r for r in rows if r["kind"] in FIRST_ORDER and r["time_to_target_s"] is not None]
    if fo:
        best_fo = min(fo, key=lambda r: r["time_to_target_s"])
    if snopt is not None and best_fo is not None and snopt["time_to_target_s"] is not None \
            and best_fo["time_to_target_s"] > 0:
        ratio = snopt["time_to_target_s"] / best_fo["time_to_target_s"]
    late = [r for r in rows if r["late_mean_metric"] is not None]
    best_late = None
    fo_late = [r for r in late if r["kind"] in FIRST_ORDER]
    if fo_late:
        best_late = (max if higher else min)(fo_late, key=lambda r: r["late_mean_metric"])
    sn_late = [r for r in late if r["kind"] == "snopt"]
    sn_late = (max if higher else min)(sn_late, key=lambda r: r["late_mean_metric"]) if sn_late else None
    return dict(target=target, target_source=target_source, metric=result.task.metric,
                snopt_late_mean=sn_late["late_mean_metric"] if sn_late else None,
                best_first_order_late_mean=best_late["late_mean_metric"] if best_late else None,
                best_first_order_late=best_late["optimizer"] if best_late else None,
                higher_is_better=higher, optimizers=rows,
                snopt_time_ratio=ratio, snopt_run=snopt["optimizer"] if snopt else None,
                best_first_order=best_fo["optimizer"] if best_fo else None,
                interrupted=result.interrupted)


def machine_info(device: torch.device) -> dict:
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        nproc = os.cpu_count()
    info = dict(cores=nproc, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                processor=platform.processor() or platform.machine(), snopt_dyn=snopt_dyn.__version__,
                device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(result: CompareResult, summary: dict) -> str:
    """The human-readable result: one row per optimizer, then the SNOpt verdict."""
    task = result.task
    metric = "acc" if task.metric == "accuracy" else task.metric
    target = summary["target"]
    header = ["optimizer", "lr", "iters", "train s", "it/s", f"final {metric}", f"best {metric}", "last 1/3 mean",
              f"time to {_fmt_metric(target, task) if target is not None else 'target'}",
              "NFE/it", "fwd/bwd", "sampling NFE/it"]
    lines = []
    for r in summary["optimizers"]:
        ttt = "-" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f} s"
        if r["time_to_target_s"] is None and target is not None:
            ttt = "not reached"
        lines.append([r["optimizer"], f"{r['lr']:g}", str(r["iterations"]), f"{r['train_clock_s']:.1f}",
                      f"{r['iters_per_s']:.2f}" if r["iters_per_s"] else "-",
                      _fmt_metric(r["final_metric"], task), _fmt_metric(r["best_metric"], task),
                      _fmt_metric(r["late_mean_metric"], task), ttt,
                      f"{r['nfe_per_iter']:.1f}",
                      f"{r['nfe_forward_per_iter']:.1f}/{r['nfe_backward_per_iter']:.1f}",
                      "-" if r["sampling_nfe_per_iter"] is None else f"{r['sampling_nfe_per_iter']:.2f}"])
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
    out = io.StringIO()
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out.write(fmt(header) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in lines:
        out.write(fmt(row) + "\n")
    if target is not None:
        out.write(f"target {_fmt_metric(target, task)}: {summary['target_source']}\n")
    ratio = summary["snopt_time_ratio"]
    snopt = next((r for r in summary["optimizers"] if r["optimizer"] == summary["snopt_run"]), None)
    if ratio is not None:
        verdict = "faster" if ratio < 1 else "slower"
        out.write(f"SNOpt time-to-target / best first-order ({summary['best_first_order']}): "
                  f"{ratio:.2f}x ({verdict})\n")
    elif snopt is not None and target is not None:
        if snopt["time_to_target_s"] is None:
            out.write("SNOpt time-to-target / best first-order: n/a (SNOpt did not reach the target)\n")
        else:
            out.write("SNOpt time-to-target / best first-order: n/a (no first-order method reached the target)\n")
    if summary["snopt_late_mean"] is not None and summary["best_first_order_late_mean"] is not None:
        out.write(f"at equal time (mean test {metric} over the last third of each run): SNOpt "
                  f"{_fmt_metric(summary['snopt_late_mean'], task)} vs best first-order "
                  f"({summary['best_first_order_late']}) {_fmt_metric(summary['best_first_order_late_mean'], task)}\n")
    for r in summary["optimizers"]:
        if r["status"] != "ok":
            out.write(f"note: {r['optimizer']} {r['status']}\n")
    if summary["interrupted"]:
        out.write("note: interrupted (Ctrl-C); the numbers cover the training done so far\n")
    return out.getvalue()


# --------------------------------------------------------------------------------------- outputs
def check_output_dir(path: str) -> str:
    """Create ``path`` if needed and prove it writable (raises ``OSError`` with a clear message)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"the output path {path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the output folder {path}: {exc.strerror or exc}") from None
    if not os.path.isdir(path):
        raise OSError(f"the output path {path} exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".snopt-dyn-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OSError(f"the output folder {path} is not writable: {exc.strerror or exc}") from None
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write, binary: bool = False) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def _json_clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


def write_outputs(result: CompareResult, summary: dict, out_dir: str, plot: bool = True) -> Dict[str, str]:
    """Write ``curves.csv``, ``results.json`` and ``compare_<task>.png`` (atomically) into ``out_dir``."""
    out_dir = check_output_dir(out_dir)
    paths = {"curves": os.path.join(out_dir, "curves.csv"), "results": os.path.join(out_dir, "results.json")}
    if plot:
        paths["plot"] = os.path.join(out_dir, f"compare_{result.task.name}.png")

    def write_csv(fh):
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for run in result.runs:
            for row in run.rows:
                writer.writerow([_csv_value(row[c]) for c in CSV_COLUMNS])

    payload = dict(settings=result.settings, summary=summary, machine=machine_info(result.task.device),
                   wall_s=result.wall_s, notes=result.notes, task_info=result.task.info,
                   files={k: os.path.basename(v) for k, v in paths.items()})

    def write_json(fh):
        json.dump(_json_clean(payload), fh, indent=2, allow_nan=False)
        fh.write("\n")

    if plot:  # the figure first: it is the step most likely to fail (matplotlib)
        _atomic_write(paths["plot"], lambda fh: plot_curves(result, summary, fh), binary=True)
    _atomic_write(paths["curves"], write_csv)
    _atomic_write(paths["results"], write_json)
    return paths


COLORS = {"snopt": "#d62728", "adam": "#1f77b4", "sgd": "#2ca02c", "sgd-plain": "#9467bd"}
LABELS = {"snopt": "SNOpt (SGD)", "adam": "Adam", "sgd": "SGD momentum", "sgd-plain": "SGD"}


def _color(run: Run, runs: List[Run]):
    """The optimizer's colour; several runs of one optimizer (a sweep) get shades of it."""
    base = COLORS.get(run.kind, "#7f7f7f")
    same = [r for r in runs if r.kind == run.kind]
    if len(same) == 1:
        return base
    import matplotlib.colors as mcolors
    k = same.index(run) / (len(same) - 1)  # 0: the full colour ... 1: pale
    return tuple(c * (1 - 0.6 * k) + 0.6 * k for c in mcolors.to_rgb(base))


def import_pyplot():
    """matplotlib's pyplot on the Agg backend, or a clear error."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install matplotlib "
                          "(or pip install 'snopt-dyn[examples]'), or pass --no-plot") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_curves(result: CompareResult, summary: dict, fh) -> None:
    """Test metric vs training wall-clock, one line per optimizer; the target as a dashed line."""
    plt = import_pyplot()
    task = result.task
    scale = 100.0 if task.metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    try:
        for run in result.runs:
            evals = run.evals
            xs = [e["train_clock_s"] for e in evals]
            ys = [scale * e["test_metric"] for e in evals]
            r = next(s for s in summary["optimizers"] if s["optimizer"] == run.name)
            label = f"{LABELS.get(run.kind, run.kind)}, lr {run.lr:g}"
            ax.plot(xs, ys, marker="o", markersize=3, lw=1.8, color=_color(run, result.runs), label=label)
            if r["time_to_target_s"] is not None:
                hit = next(e for e in evals if e["train_clock_s"] == r["time_to_target_s"])
                ax.plot([hit["train_clock_s"]], [scale * hit["test_metric"]], marker="*", markersize=14,
                        color=_color(run, result.runs), markeredgecolor="black", zorder=5)
        target = summary["target"]
        if target is not None:
            ax.axhline(scale * target, color="0.4", ls="--", lw=1,
                       label=f"target {_fmt_metric(target, task)} (★ = first reached)")
        # frame: everything after the initial ramp (the first 20% of each run's clock) stays visible
        later = [scale * e["test_metric"] for run in result.runs for e in run.evals
                 if e["train_clock_s"] >= 0.2 * run.clock]
        if later and task.metric == "accuracy":
            low = min(later) if target is None else min(min(later), scale * target)
            ax.set_ylim(max(0.0, low - 3), min(100.5, max(later) + 2))
        ax.set_xlabel("training wall-clock per optimizer [s] (evaluation excluded)")
        ax.set_ylabel("test accuracy [%]" if task.metric == "accuracy" else f"test {task.metric}")
        info = machine_info(task.device)
        threads = result.settings.get("threads", info["torch_threads"])
        where = info.get("gpu") or f"{info['cores']} CPU cores, {threads} torch thread(s)"
        ratio = summary["snopt_time_ratio"]
        verdict = f" — SNOpt time-to-target {ratio:.2f}× best first-order" if ratio is not None else ""
        ax.set_title(f"snopt-dyn compare --task {task.name}{verdict}\n{task.description}; {where}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(fh, format="png")
    finally:
        plt.close(fig)
