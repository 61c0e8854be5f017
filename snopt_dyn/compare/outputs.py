"""Writing a comparison's results: ``curves.csv``, ``results.json`` and the plot, each atomically."""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from typing import Dict

from .plots import plot_curves
from .summary import Results, _as_list, machine_info

CSV_COLUMNS = ("optimizer", "iteration", "train_clock_s", "train_loss", "test_metric",
               "nfe_forward", "nfe_backward", "sampling_nfe")


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


def write_outputs(results: Results, summary: dict, out_dir: str, plot: bool = True) -> Dict[str, str]:
    """Write ``curves.csv`` (one row per iteration of every run and seed), ``results.json`` (settings,
    summary and every seed) and ``compare_<task>.png`` (atomically) into ``out_dir``."""
    results = _as_list(results)
    task = results[0].task
    out_dir = check_output_dir(out_dir)
    paths = {"curves": os.path.join(out_dir, "curves.csv"), "results": os.path.join(out_dir, "results.json")}
    if plot:
        paths["plot"] = os.path.join(out_dir, f"compare_{task.name}.png")

    def write_csv(fh):
        writer = csv.writer(fh)
        writer.writerow(("seed",) + CSV_COLUMNS)
        for result in results:
            for run in result.runs:
                for row in run.rows:
                    writer.writerow([run.seed] + [_csv_value(row[c]) for c in CSV_COLUMNS])

    payload = dict(settings=dict(results[0].settings, seeds=[r.settings.get("seed") for r in results]),
                   summary=summary, machine=machine_info(task.device), wall_s=sum(r.wall_s for r in results),
                   notes=sorted({n for r in results for n in r.notes}), task_info=task.info,
                   files={k: os.path.basename(v) for k, v in paths.items()})

    def write_json(fh):
        json.dump(_json_clean(payload), fh, indent=2, allow_nan=False)
        fh.write("\n")

    if plot:  # the figure first: it is the step most likely to fail (matplotlib)
        _atomic_write(paths["plot"], lambda fh: plot_curves(results, summary, fh), binary=True)
    _atomic_write(paths["curves"], write_csv)
    _atomic_write(paths["results"], write_json)
    return paths
