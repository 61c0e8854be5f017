"""Shared machinery of the benchmark suite: mode, interleaved timing, recording of the results.

Modes
    quick (default, no environment variable; also ``SNOPT_DYN_QUICK=1``): small models, few
        rounds, tiny budgets -- the whole directory runs in about two minutes on 2 cores and CI runs
        it inside ``python -m pytest -q -n 2 --dist loadfile`` (under xdist pytest-benchmark's timing is off and
        the rounds run without it; the workers send their measurements to the controller, which
        prints the summary and writes the results file).  Every benchmark still asserts that what it measured is
        well formed (finite, positive ratios; the engine's memory stays flat; NFE recorded).
    full (``SNOPT_DYN_BENCH=full``): the sizes and rounds behind the figures in ``BENCHMARKS.md``.

Targets that are *claims to measure* (wrapped step time <= native, SNOpt overhead <= 10 %,
SNOpt time-to-accuracy <= 0.5x) are never asserted: they are printed at the end of the session and
written, with the machine they were measured on, to ``.benchmarks/snopt-dyn-<mode>.json``.

Why everything is interleaved: the speed of these shared machines drifts by up to 1.6x between
identical runs (docs/ARCHITECTURE.md, 'Measuring'), so two configurations timed one after the other measure the host.
Every ratio here comes from configurations that take turns, round by round, in one process, and is
the median of the per-round ratios.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
from torch import nn

# The test modules import these helpers as ``snopt_dyn_bench``: a plain ``from conftest import`` would
# pick up whichever conftest.py pytest loaded last once ``tests/`` and ``benchmarks/`` are collected
# together and both have one (pytest imports directory conftests without a package as ``conftest``).
sys.modules["snopt_dyn_bench"] = sys.modules[__name__]

MODE = "full" if os.environ.get("SNOPT_DYN_BENCH", "").strip().lower() == "full" else "quick"
FULL = MODE == "full"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".benchmarks")
RESULTS_FILE = os.path.join(RESULTS_DIR, f"snopt-dyn-{MODE}.json")

_results: Dict[str, dict] = {}
_load_at_start = None


class MLPField(nn.Module):
    """The tanh MLP vector field ``f(t, z)`` shared by the adjoint benchmarks."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, width), nn.Linear(width, dim)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(z)))


def pick(quick, full):
    """``quick`` in quick mode, ``full`` in full mode."""
    return full if FULL else quick


# ------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine() -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count()
    info = dict(cores=cores, cpu=cpu_model(), torch=torch.__version__, torch_threads=1,  # see _one_thread
                python=platform.python_version(), cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------- timing helpers
def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], sink: List[float]) -> Callable[[], object]:
    """``fn`` that appends its own wall time (perf_counter, CUDA synchronised) to ``sink``."""

    def run():
        _sync()
        tic = time.perf_counter()
        out = fn()
        _sync()
        sink.append(time.perf_counter() - tic)
        return out

    return run


def interleaved(benchmark, sides: Dict[str, Callable[[], object]], measured: str, rounds: int,
                warmup: int = 1) -> Dict[str, List[float]]:
    """Time every side once per round, the sides taking turns, and return the times per side.

    ``measured`` is the side that pytest-benchmark times (its table shows that side's absolute
    time); the other sides run in pytest-benchmark's untimed ``setup`` on even rounds and in its
    ``teardown`` on odd rounds (ABBA order, rotating among several others), so that no side always
    runs first.  ``warmup`` untimed rounds of every side come first (lazy imports, allocator).
    When pytest-benchmark is disabled (``--benchmark-disable``) the same rounds run without it.
    """
    names = list(sides)
    others = [n for n in names if n != measured]
    times: Dict[str, List[float]] = {n: [] for n in names}
    runners = {n: timed(sides[n], times[n]) for n in names}
    for _ in range(warmup):
        for n in names:
            sides[n]()
    state = {"round": 0}

    def run_others(position: str):
        r = state["round"]
        if (r % 2 == 0) != (position == "before"):
            return
        k = (r // 2) % max(len(others), 1)
        for n in others[k:] + others[:k]:
            runners[n]()

    def setup():
        run_others("before")

    def teardown(*_args, **_kwargs):
        run_others("after")
        state["round"] += 1

    def target():
        return runners[measured]()

    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, iterations=1, warmup_rounds=0)
    if len(times[measured]) < rounds:
        # pytest-benchmark disabled: it ran setup and target once, without teardown; finish here
        teardown()
        while len(times[measured]) < rounds:
            setup()
            target()
            teardown()
    n = min(len(v) for v in times.values())
    return {k: v[:n] for k, v in times.items()}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict:
    """Median, quartiles and extremes of the per-round ratios ``num[i] / den[i]``."""
    ratios = sorted(a / b for a, b in zip(num, den))
    return dict(median=statistics.median(ratios), q1=_quantile(ratios, 0.25), q3=_quantile(ratios, 0.75),
                min=ratios[0], max=ratios[-1], rounds=len(ratios))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# --------------------------------------------------------------------------------- recording
def _json_clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_clean(obj.tolist())
    return obj


@pytest.fixture
def record(benchmark):
    """``record(key, data, lines)``: keep ``data`` for the session's JSON file, attach it to
    pytest-benchmark's ``extra_info`` and, in full mode only, print ``lines`` (also in the terminal
    summary).  Quick mode prints no figures and no verdicts: its tiny runs are noise."""

    def _record(key: str, data: dict, lines: Sequence[str] = ()) -> None:
        data = _json_clean(dict(data, mode=MODE, load_average_after=load_average(),
                                recorded_at=time.strftime("%Y-%m-%d %H:%M:%S")))
        _results[key] = dict(data, summary=list(lines))
        for k, v in data.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                benchmark.extra_info[k] = v
        benchmark.extra_info["summary"] = " | ".join(lines)
        if FULL:
            print()
            for line in lines:
                print(f"[bench:{MODE}] {line}")

    return _record


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as ``snopt-dyn compare`` uses by default (small models on a shared host:
    extra threads cost more than they give and make the timings noisier); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_sessionstart(session):
    global _load_at_start
    _load_at_start = load_average()


def pytest_sessionfinish(session):
    """Under pytest-xdist, a worker hands its measurements to the controller, which prints them."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and _results:
        workeroutput["snopt_dyn_results"] = json.dumps(_json_clean(_results))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: gather a finished worker's measurements (see :func:`pytest_sessionfinish`)."""
    sent = getattr(node, "workeroutput", {}).get("snopt_dyn_results")
    if sent:
        _results.update(json.loads(sent))


def _write_results() -> Optional[str]:
    if not _results:
        return None
    try:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        old = {}
        if os.path.exists(RESULTS_FILE):
            try:
                with open(RESULTS_FILE) as fh:
                    old = json.load(fh).get("results", {})
            except (OSError, ValueError):
                old = {}
        old.update(_results)
        payload = dict(mode=MODE, machine=machine(), load_average_at_start=_load_at_start,
                       load_average_at_end=load_average(), written_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                       results=old)
        tmp = RESULTS_FILE + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(_json_clean(payload), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, RESULTS_FILE)
        return RESULTS_FILE
    except OSError as exc:  # a read-only checkout must not fail the tests
        return f"(not written: {exc})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _results or hasattr(config, "workerinput"):  # an xdist worker: the controller prints and writes
        return
    path = _write_results()
    tr = terminalreporter
    tr.write_sep("-", f"snopt-dyn benchmarks ({MODE} mode)")
    if not FULL:
        tr.write_line("quick mode: tiny models and budgets, checks that every measurement is well formed; "
                      "its figures are noise (SNOPT_DYN_BENCH=full for the figures of BENCHMARKS.md)")
    info = machine()
    tr.write_line(f"machine: {info['cores']} cores, {info['cpu']}, torch {info['torch']}, "
                  f"load average {_load_at_start} -> {load_average()}")
    if FULL:
        for key in sorted(_results):
            for line in _results[key].get("summary", []):
                tr.write_line(f"{key}: {line}")
    else:
        tr.write_line(f"{len(_results)} measurements recorded and well formed: {', '.join(sorted(_results))}")
    tr.write_line(f"results: {path}")
