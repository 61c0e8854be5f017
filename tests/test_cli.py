"""``snopt-dyn compare``: every task end to end in a tiny budget, the outputs, and bad input.

The runs use the hidden ``--max-train/--max-test`` options (evenly spaced subsets) and ``--iters``
so that each takes a few seconds on 2 cores.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

from snopt_dyn.compare import cli
from snopt_dyn.compare import CSV_COLUMNS, format_table, summarize
from snopt_dyn.compare import Task, get_task

TINY = ["--max-train", "16", "--max-test", "24", "--eval-points", "2", "--seeds", "1"]


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def parse_table(stdout: str) -> dict:
    """The printed table as {optimizer: {column: text}}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("medians", "one seed", "verdict", "note", "wrote")):
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), (header, cells)
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def read_outputs(out_dir, task):
    with open(os.path.join(out_dir, "curves.csv"), newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == ("seed",) + CSV_COLUMNS
        rows = list(reader)
    with open(os.path.join(out_dir, "results.json")) as fh:
        results = json.load(fh)
    png = os.path.join(out_dir, f"compare_{task}.png")
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    return rows, results


def pct(text: str) -> float:
    return float(text.rstrip("%")) / 100


def check_consistency(stdout, rows, results, optimizers, iters=None, metric="acc", seeds=(0,)):
    """CSV, JSON and the printed table tell the same story (``metric="nll"``: lower is better)."""
    table = parse_table(stdout)
    shown = pct if metric == "acc" else float
    summary = {r["optimizer"]: r for r in results["summary"]["optimizers"]}
    assert list(table) == list(summary) == optimizers
    assert results["summary"]["seeds"] == list(seeds) and results["settings"]["seeds"] == list(seeds)
    per_seed = results["summary"]["per_seed"]
    assert [s["seed"] for s in per_seed] == list(seeds)
    for name in optimizers:
        plateaus = []
        for seed, seed_summary in zip(seeds, per_seed):
            mine = [r for r in rows if r["optimizer"] == name and int(r["seed"]) == seed]
            its = [int(r["iteration"]) for r in mine]
            assert its == list(range(len(mine)))  # one row per iteration, 0 = before training
            if iters is not None:
                assert its[-1] == iters
            evals = [float(r["test_metric"]) for r in mine[1:] if r["test_metric"] != ""]
            assert evals and mine[0]["test_metric"] != "" and mine[-1]["test_metric"] != ""
            clocks = [float(r["train_clock_s"]) for r in mine]
            assert clocks[0] == 0 and all(b > a for a, b in zip(clocks, clocks[1:]))
            run = next(r for r in seed_summary["runs"] if r["optimizer"] == name)
            tail = evals[-math.ceil(len(evals) / 3):]
            assert math.isclose(run["plateau"], sum(tail) / len(tail))
            assert run["iterations"] == its[-1] and math.isclose(run["final_metric"], evals[-1])
            trained = mine[1:]
            nfe = sum(int(r["nfe_forward"]) + int(r["nfe_backward"]) for r in trained) / len(trained)
            assert math.isclose(run["nfe_per_iter"], nfe) and nfe > 0
            sampling = sum(int(r["sampling_nfe"]) for r in trained)
            if name == "snopt":  # the first sampling iteration is first_basis (the timeseries task's 10)
                assert (sampling > 0) == (its[-1] > results["settings"]["snopt"].get("first_basis", 0))
            else:
                assert sampling == 0 and run["sampling_nfe_per_iter"] is None
            plateaus.append(run["plateau"])
        s = summary[name]
        assert math.isclose(s["plateau"][0], statistics.median(plateaus))
        assert math.isclose(s["plateau"][1], min(plateaus)) and math.isclose(s["plateau"][2], max(plateaus))
        cell = table[name][f"plateau {metric}"]
        assert abs(shown(cell.split(" [")[0]) - s["plateau"][0]) <= 5e-5
        assert table[name]["reached"] == f"{s['reached']}/{len(seeds)}"
    for seed_summary in per_seed:  # the target is the best baseline's plateau in each seed
        baselines = [r["plateau"] for r in seed_summary["runs"] if r["kind"] != "snopt"]
        if baselines:
            best = max(baselines) if metric == "acc" else min(baselines)
            assert math.isclose(seed_summary["target"], best)
    assert results["machine"]["cores"] >= 1 and results["machine"]["torch"] == torch.__version__


def test_timeseries_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    code, stdout, stderr = run_main(capsys, "compare", "--iters", "2", "--seeds", "1", "--out", str(out), *TINY)
    assert code == 0, stderr
    rows, results = read_outputs(out, "timeseries")
    default = cli.DEFAULT_OPTIMIZERS.split(",")
    check_consistency(stdout, rows, results, default, iters=2)
    defaults = get_task("timeseries").lrs
    assert results["settings"]["lrs"] == {k: defaults[k] for k in default}
    assert results["settings"]["snopt"]["update_freq"] == get_task("timeseries").snopt["update_freq"] == 20
    for kind in ("curves.csv", "results.json", "compare_timeseries.png"):
        assert f"wrote {out / kind}" in stdout
    assert "verdict (test acc)" in stdout
    # the progress bar and the run header go to stderr, the table to stdout
    assert "training" in stderr and "optimizer" not in stderr
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("task", ["image", "latent", "flow"])
def test_other_tasks(task, tmp_path, capsys):
    out = tmp_path / task
    code, stdout, stderr = run_main(capsys, "compare", "--task", task, "--iters", "2", "--quiet", "--seeds", "1",
                                    "--optimizers", "snopt,sgd", "--out", str(out), *TINY)
    assert code == 0, stderr
    assert stderr == ""  # --quiet: nothing but errors on stderr
    rows, results = read_outputs(out, task)
    check_consistency(stdout, rows, results, ["snopt", "sgd"], iters=2, metric="nll" if task == "flow" else "acc")
    assert results["settings"]["task"] == task


def test_budget_mode_sweep_and_target(tmp_path, capsys):
    out = tmp_path / "budget"
    code, stdout, stderr = run_main(capsys, "compare", "--budget", "1.0", "--quiet", "--no-plot", "--seeds", "1",
                                    "--optimizers", "snopt,sgd@0.1,sgd@0.01", "--target", "50%",
                                    "--out", str(out), *TINY)
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["curves.csv", "results.json"]
    with open(out / "results.json") as fh:
        results = json.load(fh)
    summary = results["summary"]
    assert summary["target"] == 0.5 and "--target" in summary["target_source"]
    assert "target = given with --target" in stdout
    for r in summary["per_seed"][0]["runs"]:
        # each run stops at the first iteration that takes its clock past the budget
        assert r["train_clock_s"] >= 1.0 and r["iterations"] >= 1
    assert [r["lr"] for r in summary["optimizers"]] == [get_task("timeseries").lrs["snopt"], 0.1, 0.01]
    assert results["settings"]["budget_s"] == 1.0 and results["settings"]["iters"] is None


def test_several_seeds(tmp_path, capsys):
    """--seeds 2: every seed's runs in the CSV and JSON, medians in the table, a band in the plot."""
    out = tmp_path / "seeds"
    code, stdout, stderr = run_main(capsys, "compare", *TINY, "--task", "image", "--data", "digits", "--iters", "3",
                                    "--seeds", "2", "--seed", "5", "--optimizers", "snopt,adam", "--quiet",
                                    "--out", str(out))
    assert code == 0, stderr
    rows, results = read_outputs(out, "image")
    check_consistency(stdout, rows, results, ["snopt", "adam"], iters=3, seeds=(5, 6))
    assert "medians over 2 seeds" in stdout
    # the seeds differ (initial weights and data order), within a seed the optimizers start equal
    first = {(r["seed"], r["optimizer"]): r["test_metric"] for r in rows if r["iteration"] == "0"}
    assert first[("5", "snopt")] == first[("5", "adam")] and first[("6", "snopt")] == first[("6", "adam")]


def test_python_dash_m(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "snopt_dyn", "compare", "--iters", "1", "--optimizers",
                           "snopt,adam", "--seeds", "1", "--out", str(out), *TINY],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "optimizer" in proc.stdout and f"wrote {out / 'results.json'}" in proc.stdout
    rows, results = read_outputs(out, "timeseries")
    check_consistency(proc.stdout, rows, results, ["snopt", "adam"], iters=1)


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "invalid choice: 'nope'"),
    (["--optimizers", "snopt,lbfgs"], "unknown optimizer 'lbfgs'"),
    (["--optimizers", "adam@-1"], "learning rates must be positive"),
    (["--budget", "0"], "must be a positive number of seconds"),
    (["--budget", "-5"], "must be a positive number of seconds"),
    (["--budget", "nan"], "must be a positive number of seconds"),
    (["--iters", "0"], "must be a positive integer"),
    (["--budget", "5", "--iters", "5"], "not allowed with argument"),
    (["--target", "150"], "target accuracy"),
    (["--lr", "rmsprop=0.1"], "expected NAME=LR"),
    (["--device", "tpu"], "unknown device"),
    (["--data", "a.ts,b.ts"], "no such file"),
    (["--task", "image", "--data", "cifar"], "vendored MNIST subset"),
])
def test_bad_input(args, message, tmp_path, capsys):
    out = tmp_path / "never"
    code, stdout, stderr = run_main(capsys, "compare", "--out", str(out), *args)
    assert code != 0
    assert message in stderr
    assert stderr.count("error:") == 1 and "Traceback" not in stderr
    assert not out.exists()  # nothing written, not even the folder


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "results"  # its parent is a regular file: cannot be created (even as root)
    code, stdout, stderr = run_main(capsys, "compare", "--iters", "1", "--out", str(out), *TINY)
    assert code == 1
    assert "cannot create the output folder" in stderr and str(out) in stderr
    assert stdout == ""  # failed before training
    assert blocker.read_text() == "not a folder"
    code, stdout, stderr = run_main(capsys, "compare", "--iters", "1", "--out", str(blocker), *TINY)
    assert code == 1 and "is not a folder" in stderr


def test_no_command_and_help(capsys):
    assert cli.main([]) == 2
    assert cli.main(["compare", "--help"]) == 0
    text = capsys.readouterr().out
    assert "interleaved" in text
    assert "%%" not in text and "50% of the observations" in text  # argparse does not %-format the epilog
    for task in ("timeseries", "image", "latent", "flow"):  # every task, and the data choices
        assert re.search(rf"^  {task}\s", text, flags=re.M), task
    assert "digits" in text and "basic_motions" in text


def test_every_run_gets_its_own_folder(tmp_path, monkeypatch, capsys):
    """Without --out, each run writes into a new snopt-dyn-results/<task>-<date>-<time>/ folder."""
    monkeypatch.chdir(tmp_path)
    assert cli.run_folder("image", "given/dir") == "given/dir"
    first = cli.run_folder("image", now=0.0)
    os.makedirs(first)
    second = cli.run_folder("image", now=0.0)
    assert first != second and os.path.dirname(first) == os.path.dirname(second) == cli.RESULTS_ROOT
    assert os.path.basename(first).startswith("image-") and second.endswith("-2")
    code, stdout, _ = run_main(capsys, "compare", "--task", "image", "--data", "digits", "--iters", "1",
                               "--optimizers", "sgd", "--quiet", "--no-plot", *TINY)
    assert code == 0
    written = [line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith("wrote ")]
    root = os.path.join(str(tmp_path), cli.RESULTS_ROOT, "image-")
    assert written and all(os.path.dirname(p).startswith(root) for p in written)


class _ToyTask(Task):
    """No ODE: a Linear model on random data, whose loss blows up for one optimizer."""

    def make_model(self, seed):
        torch.manual_seed(seed)
        return torch.nn.Linear(4, 3)

    def loss(self, model, index):
        if self.explode is not None and model is self.explode() and self.calls.setdefault("n", 0) >= 1:
            raise AssertionError("non-finite values in state `y`: tensor([nan])")
        if self.explode is not None and model is self.explode():
            self.calls["n"] += 1
        return torch.nn.functional.cross_entropy(model(self.train_x[index]), self.train_y[index])

    def evaluate(self, model):
        with torch.no_grad():
            return float((model(self.test_x).argmax(-1) == self.test_y).float().mean())


def test_a_diverging_run_stops_alone():
    from snopt_dyn.compare import compare
    task = _ToyTask(name="toy", description="toy", batch_size=8, budget=1.0, lrs={"sgd": 0.1, "adam": 0.01},
                    snopt={})
    gen = torch.Generator().manual_seed(0)
    task.train_x, task.train_y = torch.randn(32, 4, generator=gen), torch.randint(3, (32,), generator=gen)
    task.test_x, task.test_y = torch.randn(16, 4, generator=gen), torch.randint(3, (16,), generator=gen)
    task.info = {"n_train": 32, "n_test": 16}
    task.calls, task.explode = {}, None
    original = task.make_model
    models = []

    def make_model(seed):
        models.append(original(seed))
        if len(models) == 2:  # the second run (sgd) diverges at its second iteration
            task.explode = lambda: models[1]
        return models[-1]

    task.make_model = make_model
    result = compare(task, ["adam", "sgd"], iters=5, eval_points=5, progress=False)
    adam, sgd = result.runs
    assert adam.iters == 5 and adam.status == "ok"
    assert sgd.iters == 2 and sgd.status.startswith("stopped at iteration 2: AssertionError: non-finite")
    assert sgd.rows[-1]["test_metric"] is None and len(sgd.evals) >= 1
    text = format_table(result, summarize(result))
    assert "note: sgd seed 0: stopped at iteration 2" in text


def test_snopt_variants_for_ablations(tmp_path, capsys):
    """snopt[key=value;...] runs SNOpt variants side by side; their options reach SNOpt."""
    from snopt_dyn.compare.optimizers import parse_optimizer, snopt_overrides
    assert parse_optimizer("snopt[moment=paper;update_freq=2]@0.05") == ("snopt", 0.05)
    assert snopt_overrides("snopt[moment=paper;update_freq=2]@0.05") == {"moment": "paper", "update_freq": 2}
    with pytest.raises(ValueError, match="only snopt takes"):
        parse_optimizer("adam[damping=1]")
    out = tmp_path / "ablation"
    code, stdout, stderr = run_main(capsys, "compare", *TINY, "--task", "image", "--data", "digits", "--iters", "4",
                                    "--optimizers", "snopt,snopt[update_freq=2]", "--quiet", "--no-plot",
                                    "--out", str(out))
    assert code == 0, stderr
    with open(out / "results.json") as fh:
        runs = {r["optimizer"]: r for r in json.load(fh)["summary"]["per_seed"][0]["runs"]}
    assert runs["snopt"]["refreshes"] == 1 and runs["snopt[update_freq=2]"]["refreshes"] == 2


def test_adam_only_options_are_checked_against_the_tasks_rule(capsys):
    """``snopt[power=1]`` needs no ``rule=adam`` where the task's SNOpt already runs the Adam rule
    (timeseries), and is refused, before any data is loaded, where it runs the paper's (image)."""
    from snopt_dyn.compare.optimizers import parse_optimizer
    for spec in ("snopt[power=1]", "snopt[relative_eps=0.3]@1e-2"):
        parse_optimizer(spec)  # the command line's first check: the task is not known yet
        parse_optimizer(spec, get_task("timeseries").snopt)
        with pytest.raises(ValueError, match="belong.*rule='adam'"):
            parse_optimizer(spec, get_task("image").snopt)
    code, _, stderr = run_main(capsys, "compare", *TINY, "--task", "image", "--iters", "1",
                               "--optimizers", "snopt[relative_eps=0.3]", "--quiet")
    assert code == 2 and "relative_eps belong(s) to rule='adam'" in stderr and "add rule='adam'" in stderr


def test_snopt_base_optimizer_options(tmp_path, capsys):
    """snopt[schedule=cosine;momentum=..;rest=adam;kl_clip=..]: the base optimizer's options are
    split from SNOpt's, checked, and reach the run (cosine schedule, momentum, an Adam for the rest)."""
    from torch import nn
    import snopt_dyn
    from snopt_dyn.compare.optimizers import Combined, make_snopt_base, parse_optimizer, split_snopt_options
    snopt, base = split_snopt_options({"damping": 0.1, "schedule": "cosine", "rest": "adam", "rest_lr": 1e-3})
    assert snopt == {"damping": 0.1} and base == {"schedule": "cosine", "rest": "adam", "rest_lr": 1e-3}
    with pytest.raises(ValueError, match="schedule"):
        parse_optimizer("snopt[schedule=linear]")
    with pytest.raises(ValueError, match="rest"):
        parse_optimizer("snopt[rest=lbfgs]")
    model = nn.Sequential(nn.Linear(3, 3), nn.GRUCell(3, 3))
    with pytest.warns(UserWarning, match="unpreconditioned_parameters"):
        precond = snopt_dyn.SNOpt(model)
    opt = make_snopt_base(precond, 0.1, momentum=0.5, rest="adam", rest_lr=1e-3)
    assert isinstance(opt, Combined)
    sgd, adam = opt.optimizers
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3
    assert {id(p) for p in adam.param_groups[0]["params"]} == {id(p) for p in model[1].parameters()}
    precond.remove()

    from snopt_dyn.compare import compare
    task = get_task("image", "digits").prepare("cpu", max_train=16, max_test=24)
    spec = "snopt[schedule=cosine;kl_clip=0.01;momentum=0.5]"
    result = compare(task, ["snopt", spec], iters=4, eval_points=2, progress=False)
    plain, variant = result.runs
    assert plain.lr_schedule is None and plain.precond.kl_clip is None
    assert variant.lr_schedule is not None and variant.precond.kl_clip == 0.01
    group = variant.optimizer.param_groups[0]
    assert group["momentum"] == 0.5 and group["lr"] < variant.lr  # decayed by the cosine
    assert 0 < float(variant.precond.diagnostics()["kl_clip_scale"]) <= 1


def test_kl_clip_reads_the_rate_of_the_step_it_clips(monkeypatch):
    """Under a schedule the rate is set before ``precond.step()``, so the clip sees the rate
    ``optimizer.step()`` then uses (not the previous iteration's)."""
    import snopt_dyn
    from snopt_dyn.compare import compare
    seen, used = [], []
    step, sgd_step = snopt_dyn.SNOpt.step, torch.optim.SGD.step

    def recording_step(self):
        seen.append(self.lr(self.steps))
        return step(self)

    def recording_sgd_step(self, closure=None):
        used.append(self.param_groups[0]["lr"])
        return sgd_step(self, closure)

    monkeypatch.setattr(snopt_dyn.SNOpt, "step", recording_step)
    monkeypatch.setattr(torch.optim.SGD, "step", recording_sgd_step)
    task = get_task("image", "digits").prepare("cpu", max_train=16, max_test=24)
    compare(task, ["snopt[schedule=cosine;kl_clip=0.01]"], iters=4, eval_points=2, progress=False)
    assert len(seen) == 4 and seen == used and len(set(used)) > 1
