"""The robust verdict of a comparison, defined once: what "SNOpt is faster" means.

Single test evaluations jump by several points between neighbours, and one seed is a lottery, so:

* an optimizer's **plateau** is the mean of the last third of its evaluations (the one before
  training excluded);
* the **target** is the best baseline's plateau (per seed);
* an optimizer **reaches** the target when the running mean of its last 3 evaluations first
  reaches it (a lucky spike alone does not count), or at its last evaluation when only its plateau
  does (so the best baseline always reaches its own plateau);
* the **time ratio** is SNOpt's time to the target over the fastest baseline's, per seed; the
  verdict takes the median over seeds (a seed where SNOpt never reaches the target counts as
  infinitely slow; one where no baseline reaches it has no ratio);
* the verdict never says "faster" when SNOpt's plateau (median over seeds) is below the best
  baseline's.

The same is computed on the training loss (optimisation speed, less noisy than test accuracy), with
one point per evaluation interval: the mean training loss of the iterations since the last evaluation.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

Curve = List[Tuple[float, float]]  # (training clock in s, value) per evaluation, in time order
WINDOW = 3


def better(a: float, b: float, higher: bool) -> bool:
    """``a`` at least as good as ``b`` (a small tolerance: accuracies are k/n fractions)."""
    return a >= b - 1e-9 if higher else a <= b + 1e-9


def plateau(curve: Curve) -> Optional[float]:
    """Mean of the last third (at least one) of the evaluations."""
    if not curve:
        return None
    tail = curve[-max(1, math.ceil(len(curve) / 3)):]
    return sum(v for _, v in tail) / len(tail)


def smoothed(curve: Curve, window: int = WINDOW) -> Curve:
    """Running mean of the last ``window`` values, from the ``window``-th point on."""
    return [(curve[i][0], sum(v for _, v in curve[i - window + 1:i + 1]) / window)
            for i in range(window - 1, len(curve))]


def time_to_reach(curve: Curve, target: float, higher: bool) -> Optional[float]:
    """Training clock at which the running mean of 3 evaluations first reaches ``target``, else ``None``.

    A run whose plateau reaches the target although no window of 3 does (a noisy plateau: the mean of
    the last third can exceed every overlapping window) reached it at its last evaluation; without
    this, the best baseline could miss its own plateau and leave no ratio.
    """
    hit = next((t for t, v in smoothed(curve) if better(v, target, higher)), None)
    if hit is None and curve and better(plateau(curve), target, higher):
        hit = curve[-1][0]
    return hit


def value_at(curve: Curve, clock: float) -> Optional[float]:
    """The running mean of 3 (or of what there is) at the last evaluation no later than ``clock``."""
    upto = [p for p in curve if p[0] <= clock + 1e-9]
    if not upto:
        return None
    tail = upto[-WINDOW:]
    return sum(v for _, v in tail) / len(tail)


@dataclass
class SeedVerdict:
    """One seed: every optimizer's plateau and time to the target, and SNOpt's ratio."""

    target: Optional[float]
    best_baseline: Optional[str]        # the baseline whose plateau is the target
    fastest_baseline: Optional[str]     # the baseline that reached the target first
    plateaus: Dict[str, Optional[float]]
    times: Dict[str, Optional[float]]
    ratio: Optional[float]              # SNOpt / fastest baseline; inf when SNOpt never reached it


def seed_verdict(curves: Dict[str, Curve], snopt: str, baselines: Sequence[str], higher: bool,
                 target: Optional[float] = None) -> SeedVerdict:
    """The verdict of one seed from each run's evaluation curve (pre-training point excluded);
    ``target`` fixes the target instead of the best baseline's plateau."""
    plateaus = {name: plateau(c) for name, c in curves.items()}
    best = None
    if target is None:
        scored = [b for b in baselines if plateaus.get(b) is not None]
        if not scored:
            return SeedVerdict(None, None, None, plateaus, {n: None for n in curves}, None)
        best = (max if higher else min)(scored, key=lambda b: plateaus[b])
        target = plateaus[best]
    times = {name: time_to_reach(c, target, higher) for name, c in curves.items()}
    reached = [b for b in baselines if times.get(b) is not None]
    fastest = min(reached, key=lambda b: times[b]) if reached else None
    ratio = None
    if fastest is not None and snopt in curves and times[fastest] > 0:
        ratio = math.inf if times[snopt] is None else times[snopt] / times[fastest]
    return SeedVerdict(target, best, fastest, plateaus, times, ratio)


def spread(values: Sequence[Optional[float]]) -> Optional[Tuple[float, float, float]]:
    """``(median, min, max)`` of the values that exist (``inf`` allowed), or ``None``."""
    have = [v for v in values if v is not None]
    if not have:
        return None
    return statistics.median(have), min(have), max(have)


def verdict_text(ratio: Optional[Tuple[float, float, float]], snopt_plateau: Optional[float],
                 best_plateau: Optional[float], best: Optional[str], higher: bool, seeds: int,
                 with_ratio: Optional[int] = None, fmt=lambda v: f"{v:.4g}") -> str:
    """One sentence; says "faster" only when the median ratio < 1 *and* SNOpt's plateau is not lower.

    ``with_ratio``: in how many of the ``seeds`` a baseline reached the target (the others have no ratio).
    """
    if ratio is None or snopt_plateau is None or best_plateau is None:
        return "no verdict: no baseline reached its own plateau (or SNOpt did not run)"
    med, lo, hi = ratio
    plateau_ok = better(snopt_plateau, best_plateau, higher)
    with_ratio = seeds if with_ratio is None else with_ratio
    where = f"median over {with_ratio} of {seeds} seeds" if with_ratio != seeds else \
        f"median over {seeds} seed{'s' if seeds != 1 else ''}"
    where += f", range {_x(lo)}-{_x(hi)}" if lo != hi else ""
    if math.isinf(med):
        speed = "SNOpt did not reach the best baseline's plateau in most seeds"
    else:
        speed = f"SNOpt time to the best baseline's plateau / fastest baseline: {_x(med)} ({where})"
    side = "higher" if higher else "lower"
    if plateau_ok:
        word = "faster" if med < 1 else "not faster"
        return (f"{speed}: {word}; SNOpt's plateau {fmt(snopt_plateau)} vs best baseline ({best}) "
                f"{fmt(best_plateau)}")
    return (f"{speed}; but SNOpt's plateau {fmt(snopt_plateau)} is not {side} than the best baseline's "
            f"({best}, {fmt(best_plateau)}): not faster")


#: a target less than this many accuracy points above the majority-class rate (or 3 test examples, on a
#: small test set) is "near chance": the runs have barely started learning (BENCHMARKS.md §6, OSULeaf)
CHANCE_MARGIN = 0.03


def near_chance(target: float, majority: float, n_test: int) -> bool:
    """Whether an accuracy ``target`` is so close to always predicting the majority class that a time
    to reach it measures noise, not speed."""
    return target < majority + max(CHANCE_MARGIN, 3 / max(n_test, 1))


def chance_warning(target: float, majority: float) -> str:
    """The sentence that tells the user why such a verdict says little, and what to do."""
    where = "barely above" if target > majority else "not above"
    return (f"warning: the best baseline's plateau ({100 * target:.2f}%) is {where} always predicting the "
            f"training set's most frequent class ({100 * majority:.2f}%): within this budget the baselines have "
            f"learned little, so the time to reach their plateau measures noise; rerun with a larger --budget (e.g. 3x)")


def _x(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.2f}x"
