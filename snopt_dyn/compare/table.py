"""The printed result of a comparison: one row per optimizer (medians and spreads over seeds), then the verdict."""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from .summary import Results, _as_list, fmt_metric

if TYPE_CHECKING:
    from .tasks.base import Task


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "never" if math.isinf(value) else f"{value:.1f}"


def _spread(values: Optional[Tuple[float, float, float]], fmt) -> str:
    if values is None:
        return "-"
    med, lo, hi = values
    return fmt(med) if lo == hi else f"{fmt(med)} [{fmt(lo)}, {fmt(hi)}]"


def _row(o: dict, task: "Task") -> List[str]:
    metric = lambda v: fmt_metric(v, task)  # noqa: E731
    return [o["optimizer"], f"{o['lr']:g}", f"{o['iters_per_s']:.2f}" if o["iters_per_s"] else "-",
            _spread(o["plateau"], metric), _spread(o["time_to_target_s"], _seconds), f"{o['reached']}/{o['seeds']}",
            metric(o["at_quarter"]), metric(o["at_half"]),
            "-" if o["loss_plateau"] is None else f"{o['loss_plateau']:.4f}",
            f"{o['nfe_per_iter']:.1f} ({o['nfe_forward_per_iter']:.0f}/{o['nfe_backward_per_iter']:.0f})",
            "-" if o["sampling_nfe_per_iter"] is None else f"{o['sampling_nfe_per_iter']:.2f}"]


def _grid(header: Sequence[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]) + "\n"


def format_table(results: Results, summary: dict) -> str:
    """The human-readable result: the table, how to read it, and the verdict on test metric and loss."""
    task = _as_list(results)[0].task
    name = "acc" if task.metric == "accuracy" else task.metric
    seeds = len(summary["seeds"])
    header = ["optimizer", "lr", "it/s", f"plateau {name}", "time to target s", "reached", "@1/4", "@1/2",
              "train-loss plateau", "NFE/it (fwd/bwd)", "sampling NFE/it"]
    out = io.StringIO()
    out.write(_grid(header, [_row(o, task) for o in summary["optimizers"]]))
    many = f"medians over {seeds} seeds [min, max]" if seeds > 1 else "one seed"
    out.write(f"{many}; plateau = mean of the last third of the test evaluations; target = "
              + ("given with --target" if summary["target"] is not None else "the best baseline's plateau")
              + "; reached = running mean of 3 evaluations at the target; @1/4, @1/2 = that running mean at 1/4 "
                "and 1/2 of the budget\n")
    verdict = summary["verdict"]
    out.write(f"verdict (test {name}): {verdict['text']}\n")
    if verdict.get("warning"):
        out.write(verdict["warning"] + "\n")
    loss = verdict["loss_ratio"]
    if loss is not None:
        med, lo, hi = loss
        show = lambda v: "never" if math.isinf(v) else f"{v:.2f}x"  # noqa: E731
        out.write(f"verdict (training loss): SNOpt time to the best baseline's training-loss plateau / fastest "
                  f"baseline: {show(med)} (range {show(lo)}-{show(hi)})\n")
    for o in summary["optimizers"]:
        if o["status"] != "ok":
            out.write(f"note: {o['optimizer']} {o['status']}\n")
    if summary["interrupted"]:
        out.write("note: interrupted (Ctrl-C); the numbers cover the training done so far\n")
    return out.getvalue()
