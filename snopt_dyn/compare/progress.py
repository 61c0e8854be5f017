"""The tqdm progress bar of a comparison (optional: without tqdm there is no bar).

The latest test metric of every run is shown in the bar's description, not in tqdm's postfix
(tqdm prefixes a postfix with ", ", which read as a stray comma).
"""
from __future__ import annotations

import sys
from typing import List, Optional

from .summary import fmt_metric


def status(runs: List, task) -> str:
    """``"seed 0: snopt 91.2% adam 90.1%"``: each run's latest test metric."""
    parts = [f"{run.name} {fmt_metric(run.evals[-1]['test_metric'], task)}" for run in runs if run.evals]
    return " ".join([f"seed {runs[0].seed}:"] + parts)


def progress_bar(enabled: bool, runs: List, budget: Optional[float], iters: Optional[int], seed: int = 0):
    """A tqdm bar on stderr counting training-clock seconds (or iterations) over all runs, or ``None``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar then
        return None
    desc = f"seed {seed}: training " + "/".join(r.name for r in runs)
    if budget is not None:
        return tqdm(total=budget * len(runs), unit="s", desc=desc, file=sys.stderr, dynamic_ncols=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} train-s [{elapsed}<{remaining}]")
    return tqdm(total=iters * len(runs), unit="it", desc=desc, file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} it [{elapsed}<{remaining}]")
