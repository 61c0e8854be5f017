"""Memory: peak memory of one training step vs the number of solver steps.

The model is user code calling ``torchdiffeq.odeint`` (fixed-step rk4, ``step_size = 1/steps``, an
MLP field on a float64 state).  Unwrapped, that is back-propagation through the solver, whose graph
grows with the number of steps; ``snopt_dyn.wrap(model)`` routes the same call to the engine adjoint;
``torchdiffeq.odeint_adjoint`` (native adjoint) is the library's own O(1) reference (full mode).

On CPU every measurement runs in a **fresh subprocess**: one warm-up step (lazy imports, first-call
allocations), ``gc.collect()``, then the peak RSS is reset (``/proc/self/clear_refs`` <- ``5``) and
the step's extra peak is ``VmHWM - VmRSS(before)`` from ``/proc/self/status``.  glibc's mmap
threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so that every freed tensor goes back to the OS at
once; with the default adaptive threshold the heap keeps earlier memory and a step that reuses it
shows almost no extra RSS (the approach of ``tests/test_adjoint.py``).  With CUDA the same script
uses ``torch.cuda.max_memory_allocated`` instead.

Asserted in every mode: engine peak ratio (20x more solver steps) <= 1.1, backprop's >= 3.
Target (the same, measured): engine ratio <= 1.1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from snopt_dyn_bench import FULL, finite_positive, median, pick

SHORT = 5
LONG = 100          # 20x more solver steps

_SCRIPT = textwrap.dedent("""
    import gc, json, sys, torch, torchdiffeq, snopt_dyn
    from torch import nn
    torch.set_num_threads(1)
    mode, steps, rows, cuda = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")

    def status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))

        def forward(self, t, z):
            return self.net(z)

    class Model(nn.Module):          # user code: back-propagation through torchdiffeq.odeint
        def __init__(self, adjoint):
            super().__init__()
            self.field, self.adjoint = Field(), adjoint

        def forward(self, z0, steps):
            solve = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
            t = torch.tensor([0.0, 1.0], dtype=z0.dtype, device=z0.device)
            return solve(self.field, z0, t, method="rk4", options=dict(step_size=1.0 / steps))[-1]

    torch.manual_seed(0)
    model = Model(adjoint=(mode == "native-adjoint")).double().to(device)
    if mode == "engine":
        model = snopt_dyn.wrap(model)
    y0 = torch.randn(rows, 64, dtype=torch.float64, device=device, requires_grad=True)

    def train_step(n):
        model.zero_grad(set_to_none=True)
        y0.grad = None
        model(y0, n).pow(2).mean().backward()

    train_step(2)                    # warm-up
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(steps)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")            # reset the peak RSS (VmHWM) to the current RSS
        base = status("VmRSS")
        train_step(steps)
        extra = status("VmHWM") - base
    print(json.dumps(dict(mode=mode, steps=steps, extra_bytes=extra)))
""")


def _measure(mode: str, steps: int, rows: int, cuda: bool) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode, str(steps), str(rows), "cuda" if cuda else "cpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"])


def test_memory_vs_solver_steps(benchmark, record):
    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc (clear_refs, VmHWM) or CUDA")
    rows = pick(500, 2000)                   # state: rows x 64 float64 (256 KB quick, 1 MB full)
    repeats = pick(1, 3)                     # fresh subprocesses per point; the median is reported
    modes = ["engine", "backprop"] + (["native-adjoint"] if FULL else [])
    jobs = [(m, s) for _ in range(repeats) for m in modes for s in (SHORT, LONG)]
    peaks = {(m, s): [] for m in modes for s in (SHORT, LONG)}

    def run_all():
        # one fresh process per measurement; a peak RSS belongs to its process, so the processes may
        # run side by side on CPU (on CUDA one at a time, not to compete for the device's memory)
        workers = 1 if cuda else 4
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for (m, s), extra in zip(jobs, pool.map(lambda job: _measure(job[0], job[1], rows, cuda), jobs)):
                peaks[(m, s)].append(extra)

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    mb = {f"{m}@{s}": median(v) / 2 ** 20 for (m, s), v in peaks.items()}
    ratio = {m: median(peaks[(m, LONG)]) / median(peaks[(m, SHORT)]) for m in modes}
    lines = [f"one rk4 training step, state {rows}x64 float64, {SHORT} -> {LONG} solver steps, extra peak "
             f"{'CUDA memory' if cuda else 'RSS'} (median of {repeats} fresh process(es)): " +
             "; ".join(f"{m} {mb[f'{m}@{SHORT}']:.1f} -> {mb[f'{m}@{LONG}']:.1f} MB (x{ratio[m]:.2f})" for m in modes),
             f"engine ratio {ratio['engine']:.2f} (target <= 1.1: {'met' if ratio['engine'] <= 1.1 else 'MISSED'}); "
             f"backprop ratio {ratio['backprop']:.2f}"]
    record("memory", dict(method="rk4", state=[rows, 64], dtype="float64", short_steps=SHORT, long_steps=LONG,
                          measure="cuda max_memory_allocated" if cuda else "VmHWM - VmRSS, fresh subprocess",
                          repeats=repeats, extra_peak_mb_median=mb, ratio=ratio,
                          raw_bytes={f"{m}@{s}": v for (m, s), v in peaks.items()},
                          target="engine ratio <= 1.1", target_met=ratio["engine"] <= 1.1), lines)

    assert all(finite_positive(v) for vals in peaks.values() for v in vals)
    assert ratio["backprop"] >= 3, "the measurement cannot see backprop's growth"
    assert ratio["engine"] <= 1.1
    if "native-adjoint" in ratio:
        assert ratio["native-adjoint"] <= 1.5
