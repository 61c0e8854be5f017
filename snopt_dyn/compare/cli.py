"""Command line: ``snopt-dyn compare`` (also ``python -m snopt_dyn compare``).

``main(argv)`` returns the exit status: 0 on success, 1 when the run cannot start or fails
(a missing dependency, an unusable device or output folder), 2 for bad arguments, 130 when
interrupted (whatever was trained so far is still summarised and written).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

from .optimizers import OPTIMIZER_HELP, OPTIMIZER_NAMES, parse_optimizer
from .outputs import check_output_dir, write_outputs
from .plots import import_pyplot
from .runner import compare_seeds
from .summary import machine_info, summarize
from .table import format_table
from .tasks import TASKS, TaskError, get_task

DEFAULT_OPTIMIZERS = "snopt,adamw-cosine,soap"
DEFAULT_SEEDS = 3


EPILOG = """\
what it does:
  Trains one task with each optimizer, interleaved in one process: every optimizer has its own
  model (same initial weights), optimizer, data order (the same for all) and clock, and they take
  turns one iteration at a time. Only training iterations are timed; test evaluations are not.
  Prints a table (final/best test accuracy, time to the target accuracy, iterations/s, solver
  evaluations per iteration) and writes curves.csv, results.json and compare_<task>.png into a new
  folder per run, ./snopt-dyn-results/<task>-<date>-<time>/ (or --out DIR).

tasks (--data picks the data set where a task has several):
  timeseries  torchcde Neural CDE on UEA JapaneseVowels (default)
              --data japanese_vowels | basic_motions | TRAIN.ts,TEST.ts (your own UEA files)
  image       torchdyn conv Neural ODE on a 4,000/1,000 MNIST subset
              --data mnist (default) | digits (sklearn 8x8 digits: quick, too easy to rank optimizers)
  latent      ODE-RNN classifier on JapaneseVowels with 50% of the observations dropped
              --data as for timeseries
  flow        continuous normalizing flow (FFJORD-style CNF) on the diamonds table, test NLL
  sde         latent SDE (torchsde, logqp ELBO) on UEA BasicMotions, test reconstruction MSE

optimizers:
""" + "\n".join(f"  {k:<10}  {v}" for k, v in OPTIMIZER_HELP.items()) + """

examples:
  snopt-dyn compare                                  # timeseries, ~8 minutes on 2 cores
  snopt-dyn compare --task image --budget 30
  snopt-dyn compare --task image --data digits --budget 20
  snopt-dyn compare --optimizers snopt,sgd --iters 200 --lr sgd=0.05
  snopt-dyn compare --data CharacterTrajectories_TRAIN.ts,CharacterTrajectories_TEST.ts
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors through an exception instead of exiting the process."""

    def error(self, message):
        raise _UsageError(self.prog, message, self.format_usage())


class _UsageError(Exception):
    def __init__(self, prog, message, usage):
        super().__init__(message)
        self.prog, self.usage = prog, usage


def _optimizer_list(text: str) -> List[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    for name in names:
        try:
            parse_optimizer(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    if not names:
        raise argparse.ArgumentTypeError("give at least one optimizer")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an optimizer is listed twice: {text!r}")
    return names


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _lr_overrides(text: str) -> Dict[str, float]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in OPTIMIZER_NAMES:
            raise argparse.ArgumentTypeError(
                f"expected NAME=LR[,NAME=LR] with NAME in {', '.join(OPTIMIZER_NAMES)}, got {part!r}")
        try:
            lr = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not lr > 0:
            raise argparse.ArgumentTypeError(f"learning rates must be positive, got {part!r}")
        out[name] = lr
    return out


def _target(text: str) -> float:
    raw = text.strip().rstrip("%")
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if text.strip().endswith("%") or value > 1:
        value /= 100.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a target accuracy must lie in (0, 1] or (0%, 100%], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``snopt-dyn`` argument parser (errors raise instead of exiting)."""
    parser = _Parser(prog="snopt-dyn", description="SNOpt, a second-order optimizer for neural ODEs/CDEs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    cmd = sub.add_parser("compare", help="train one task with SNOpt and baselines, interleaved, and compare",
                         description="Compare SNOpt with first-order optimizers in wall-clock time.",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(cmd)
    _add_output_arguments(cmd)
    return parser


def _add_run_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--task", default="timeseries", choices=list(TASKS), help="what to train (default: timeseries)")
    cmd.add_argument("--data", default="", metavar="SOURCE",
                     help="timeseries/latent: japanese_vowels (default), basic_motions or TRAIN.ts,TEST.ts (UEA "
                          "files); image: mnist (default) or digits; flow: diamonds only")
    cmd.add_argument("--optimizers", type=_optimizer_list, default=_optimizer_list(DEFAULT_OPTIMIZERS),
                     metavar="LIST", help=f"comma list from {','.join(OPTIMIZER_NAMES)} (default: {DEFAULT_OPTIMIZERS}); "
                          "NAME@LR sets a run's learning rate, e.g. adam@1e-3,adam@3e-3 for a sweep")
    limit = cmd.add_mutually_exclusive_group()
    limit.add_argument("--budget", type=_positive_float, metavar="SECONDS",
                       help="training-clock seconds per optimizer (default: the task's)")
    limit.add_argument("--iters", type=_positive_int, metavar="N", help="iterations per optimizer instead of a time budget")
    cmd.add_argument("--target", type=_target, metavar="ACC",
                     help="target accuracy for 'time to target', e.g. 0.93 or 93%% (default: the best final "
                          "accuracy of the first-order methods)")
    cmd.add_argument("--seeds", type=_positive_int, default=DEFAULT_SEEDS, metavar="K",
                     help=f"run K seeds, each with every optimizer interleaved; the table shows medians and "
                          f"[min, max] (default: {DEFAULT_SEEDS})")
    cmd.add_argument("--seed", type=int, default=0,
                     help="the first seed (initial weights and data order, the same for every optimizer; default: 0)")
    cmd.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    cmd.add_argument("--threads", type=_positive_int, metavar="N",
                     help="torch CPU threads (default: 1; the task models are small, and extra threads on a "
                          "shared machine cost far more than they give)")
    cmd.add_argument("--batch-size", type=_positive_int, metavar="N", help="default: the task's")
    cmd.add_argument("--lr", type=_lr_overrides, metavar="NAME=LR[,...]",
                     help="override tuned learning rates, e.g. --lr adam=1e-3,sgd=0.05 (for snopt: its base SGD's)")
    cmd.add_argument("--damping", type=_positive_float, help="SNOpt damping (default: the task's, 0.05)")
    cmd.add_argument("--update-freq", type=_positive_int, metavar="N", help="SNOpt refresh interval (default: the task's)")
    cmd.add_argument("--eval-points", type=_positive_int, metavar="N",
                     help="test evaluations per optimizer over the budget (default: the task's)")
    # for tests and quick checks: train/test on N evenly spaced examples only
    cmd.add_argument("--max-train", type=_positive_int, help=argparse.SUPPRESS)
    cmd.add_argument("--max-test", type=_positive_int, help=argparse.SUPPRESS)


def _add_output_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--out", metavar="DIR",
                     help="output folder (default: a new folder per run, ./snopt-dyn-results/<task>-<date>-<time>)")
    cmd.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar or notes; still prints the table and file paths")


RESULTS_ROOT = "snopt-dyn-results"


def run_folder(task: str, out: Optional[str] = None, now: Optional[float] = None) -> str:
    """``out`` when given, else a new ``./snopt-dyn-results/<task>-YYYYmmdd-HHMMSS`` (``-2``, ``-3``... if
    taken): one folder per run, so a run never overwrites another's results."""
    if out is not None:
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path = os.path.join(RESULTS_ROOT, f"{task}-{stamp}")
    k = 2
    while os.path.exists(path):
        path, k = os.path.join(RESULTS_ROOT, f"{task}-{stamp}-{k}"), k + 1
    return path


def _fail(message: str, code: int = 1) -> int:
    print(f"snopt-dyn: error: {message}", file=sys.stderr)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        sys.stderr.write(exc.usage)
        return _fail(str(exc), 2)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return _compare(args)


class _Stop(Exception):
    """A message and an exit code: the run cannot start."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _compare(args) -> int:
    try:
        task, device, out_dir = _check_setup(args)
        _prepare(task, device, args)
    except _Stop as stop:
        return _fail(str(stop), stop.code)
    try:
        result = compare_seeds(task, args.optimizers, range(args.seed, args.seed + args.seeds), budget=args.budget,
                               iters=args.iters, batch_size=args.batch_size, lrs=args.lr,
                               snopt_options=_snopt_options(args), eval_points=args.eval_points,
                               progress=not args.quiet)
    except (TaskError, ValueError) as exc:
        return _fail(str(exc))
    return _report(result, args, device, out_dir)


def _check_setup(args):
    """Everything that can be checked before training: task, device, plotting, output folder."""
    import torch
    try:
        task = get_task(args.task, args.data)
        for name in args.optimizers:  # the brackets again, on top of this task's SNOpt defaults
            parse_optimizer(name, {**task.snopt, **_snopt_options(args)})
    except ValueError as exc:
        raise _Stop(str(exc), 2) from None
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise _Stop(f"unknown device {args.device!r}; use cpu, cuda or cuda:N", 2) from None
    if device.type not in ("cpu", "cuda"):
        raise _Stop(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Stop(f"--device {args.device}: CUDA is not available on this machine")
    if not args.no_plot:
        try:
            import_pyplot()
        except ImportError as exc:
            raise _Stop(str(exc)) from None
    try:
        out_dir = check_output_dir(run_folder(task.name, args.out))
    except OSError as exc:
        raise _Stop(str(exc)) from None
    return task, device, out_dir


def _snopt_options(args) -> Dict[str, float]:
    options = {}
    if args.damping is not None:
        options["damping"] = args.damping
    if args.update_freq is not None:
        options["update_freq"] = args.update_freq
    return options


def _prepare(task, device, args) -> None:
    import torch
    if device.type == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    try:
        task.prepare(device, max_train=args.max_train, max_test=args.max_test)
    except (TaskError, ValueError, OSError) as exc:
        raise _Stop(str(exc)) from None
    if not args.quiet:
        limit = f"{args.iters} iterations" if args.iters else f"{args.budget or task.budget:g} s of training clock"
        print(f"snopt-dyn compare: task {task.name} ({task.description}; data {task.data}, "
              f"{task.info['n_train']} train / {task.info['n_test']} test), {', '.join(args.optimizers)}, "
              f"{limit} each, {args.seeds} seed(s) from {args.seed}, {device}", file=sys.stderr)


def _report(results, args, device, out_dir: str) -> int:
    task = results[0].task
    summary = summarize(results, args.target)
    info = machine_info(device)
    where = info.get("gpu") or f"{info['cores']} cores, {info['torch_threads']} torch thread(s)"
    print(f"task {task.name}: {task.description} ({task.info['n_train']} train / {task.info['n_test']} test) | "
          f"{where} | torch {info['torch']} | seeds {', '.join(map(str, summary['seeds']))}")
    print(format_table(results, summary), end="")
    if not args.quiet:
        for note in dict.fromkeys(n for r in results for n in r.notes):
            print(f"note: {note}", file=sys.stderr)
    try:
        paths = write_outputs(results, summary, out_dir, plot=not args.no_plot)
    except OSError as exc:
        return _fail(f"could not write the results to {out_dir}: {exc}")
    for kind in ("curves", "results", "plot"):
        if kind in paths:
            print(f"wrote {paths[kind]}")
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
