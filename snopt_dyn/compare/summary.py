"""The numbers of a comparison over one or several seeds: per-run rows, per-optimizer medians and
spreads, and the robust verdict of :mod:`.verdict`."""
from __future__ import annotations

import math
import os
import platform
import statistics
from typing import List, Optional, Sequence, Union

import torch

import snopt_dyn
from .optimizers import BASELINES
from .verdict import (Curve, SeedVerdict, better, chance_warning, near_chance, seed_verdict, spread, value_at,
                      verdict_text)

from .results import CompareResult, Run
from .tasks.base import Task

Results = Union["CompareResult", Sequence["CompareResult"]]


def fmt_metric(value: Optional[float], task: "Task") -> str:
    """``94.59%`` for accuracies, ``-3.4567`` for other metrics, ``-`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%" if task.metric == "accuracy" else f"{value:.4f}"


def metric_curve(run: "Run") -> Curve:
    """``(clock, test metric)`` of every evaluation after training started."""
    return [(e["train_clock_s"], e["test_metric"]) for e in run.evals if e["iteration"] > 0]


def loss_curve(run: "Run") -> Curve:
    """One point per evaluation interval: the mean training loss of its iterations."""
    points, losses = [], []
    for row in run.rows[1:]:
        if row["train_loss"] is not None and math.isfinite(row["train_loss"]):
            losses.append(row["train_loss"])
        if row["test_metric"] is not None and losses:
            points.append((row["train_clock_s"], sum(losses) / len(losses)))
            losses = []
    return points


def _as_list(results: Results) -> List["CompareResult"]:
    return [results] if not isinstance(results, (list, tuple)) else list(results)


def summarize(results: Results, target: Optional[float] = None) -> dict:
    """The table's numbers for one comparison or a list of them (one per seed).

    ``target`` fixes the target metric for every seed (default: each seed's best baseline plateau).
    """
    results = _as_list(results)
    task = results[0].task
    higher = task.higher_is_better
    per_seed = [_seed_summary(r, target, higher) for r in results]
    names = [run.name for run in results[0].runs]
    optimizers = [_aggregate(name, [row for s in per_seed for row in s["runs"] if row["optimizer"] == name])
                  for name in names]
    verdict = _overall_verdict(per_seed, optimizers, task, higher)
    return dict(metric=task.metric, higher_is_better=higher, seeds=[s["seed"] for s in per_seed],
                target=target, target_source="given with --target" if target is not None else
                "per seed: the best baseline's plateau (mean of its last third of evaluations)",
                per_seed=per_seed, optimizers=optimizers, verdict=verdict,
                interrupted=any(r.interrupted for r in results))


def _seed_summary(result: "CompareResult", target: Optional[float], higher: bool) -> dict:
    runs = result.runs
    snopt = next((r.name for r in runs if r.kind == "snopt"), None)
    baselines = [r.name for r in runs if r.kind in BASELINES]
    curves = {r.name: metric_curve(r) for r in runs}
    losses = {r.name: loss_curve(r) for r in runs}
    test = seed_verdict(curves, snopt or "", baselines, higher, target)
    train = seed_verdict(losses, snopt or "", baselines, False)
    horizon = result.settings.get("budget_s") or min((r.clock for r in runs), default=0.0)
    rows = [_run_row(r, curves[r.name], losses[r.name], test, train, horizon) for r in runs]
    return dict(seed=runs[0].seed if runs else None, target=test.target, best_baseline=test.best_baseline,
                fastest_baseline=test.fastest_baseline, ratio=test.ratio, loss_target=train.target,
                loss_ratio=train.ratio, runs=rows)


def _run_row(run: "Run", curve: Curve, losses: Curve, test: SeedVerdict, train: SeedVerdict, horizon: float) -> dict:
    iters = max(run.iters, 1)
    values = [v for _, v in curve]
    precond = run.precond
    return dict(
        optimizer=run.name, kind=run.kind, lr=run.lr, seed=run.seed, iterations=run.iters,
        train_clock_s=run.clock, final_metric=values[-1] if values else None,
        plateau=test.plateaus.get(run.name), time_to_target_s=test.times.get(run.name),
        at_quarter=value_at(curve, horizon / 4), at_half=value_at(curve, horizon / 2),
        loss_plateau=train.plateaus.get(run.name), loss_time_to_target_s=train.times.get(run.name),
        iters_per_s=run.iters / run.clock if run.clock > 0 else None,
        nfe_per_iter=(run.nfe_forward + run.nfe_backward) / iters,
        nfe_forward_per_iter=run.nfe_forward / iters, nfe_backward_per_iter=run.nfe_backward / iters,
        sampling_nfe_per_iter=run.sampling_nfe / iters if precond is not None else None,
        refreshes=precond.refreshes if precond is not None else None,
        precond_time_s=precond.total_step_time if precond is not None else None, status=run.status)


def _median(rows: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def _aggregate(name: str, rows: List[dict]) -> dict:
    """One optimizer over the seeds: medians, and [min, max] of plateau and time to target."""
    times = [r["time_to_target_s"] for r in rows]
    bad = [f"seed {r['seed']}: {r['status']}" for r in rows if r["status"] != "ok"]
    out = dict(optimizer=name, kind=rows[0]["kind"], lr=rows[0]["lr"], seeds=len(rows),
               plateau=spread([r["plateau"] for r in rows]),
               time_to_target_s=spread([t if t is not None else math.inf for t in times]),
               reached=sum(t is not None for t in times), status="; ".join(bad) or "ok")
    for key in ("final_metric", "at_quarter", "at_half", "loss_plateau", "iters_per_s", "nfe_per_iter",
                "nfe_forward_per_iter", "nfe_backward_per_iter", "sampling_nfe_per_iter", "train_clock_s",
                "iterations"):
        out[key] = _median(rows, key)
    return out


def _overall_verdict(per_seed: List[dict], optimizers: List[dict], task: "Task", higher: bool) -> dict:
    snopt = next((o for o in optimizers if o["kind"] == "snopt"), None)
    baselines = [o for o in optimizers if o["kind"] in BASELINES and o["plateau"] is not None]
    best = (max if higher else min)(baselines, key=lambda o: o["plateau"][0]) if baselines else None
    ratio = spread([s["ratio"] for s in per_seed])
    loss_ratio = spread([s["loss_ratio"] for s in per_seed])
    snopt_plateau = snopt["plateau"][0] if snopt and snopt["plateau"] else None
    best_plateau = best["plateau"][0] if best else None
    text = verdict_text(ratio, snopt_plateau, best_plateau, best["optimizer"] if best else None, higher,
                        len(per_seed), with_ratio=sum(s["ratio"] is not None for s in per_seed),
                        fmt=lambda v: fmt_metric(v, task))
    faster = bool(ratio and ratio[0] < 1 and snopt_plateau is not None and best_plateau is not None
                  and better(snopt_plateau, best_plateau, higher))
    majority = majority_rate(task)
    chance = majority is not None and best_plateau is not None and near_chance(best_plateau, *majority)
    return dict(ratio=ratio, loss_ratio=loss_ratio, snopt_plateau=snopt_plateau,
                best_baseline=best["optimizer"] if best else None, best_plateau=best_plateau,
                faster=faster, text=text, majority_rate=majority[0] if majority else None, near_chance=chance,
                warning=chance_warning(best_plateau, majority[0]) if chance else None)


def majority_rate(task: "Task"):
    """``(test accuracy of always predicting the training set's most frequent class, test size)`` for a
    classification task with integer labels, else ``None``."""
    ytr, yte = getattr(task, "train_y", None), getattr(task, "test_y", None)
    if task.metric != "accuracy" or not isinstance(ytr, torch.Tensor) or not isinstance(yte, torch.Tensor):
        return None
    if ytr.dim() != 1 or yte.dim() != 1 or ytr.dtype.is_floating_point or ytr.numel() == 0 or yte.numel() == 0:
        return None
    most = torch.bincount(ytr.long().cpu()).argmax()
    return float((yte.long().cpu() == most).float().mean()), int(yte.numel())


def machine_info(device: torch.device) -> dict:
    """Cores, threads, versions and device: printed with every result."""
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
