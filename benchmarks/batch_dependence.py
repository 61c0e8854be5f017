"""How much a prediction depends on the other series in its batch, by error norm and tolerance.

A ``NeuralCDEClassifier`` is fitted on JapaneseVowels (``--epochs``, no early stopping); then 20
test series are predicted alone, with 9 random companions, with 99, and inside the whole test set,
for each setting: torchdiffeq's joint norm or per-sample error control, at rtol = atol = 1e-3,
1e-4, 1e-5.  Prints the largest spread of a predicted probability, the labels that flipped, and
the forward NFE and time of predicting the whole test set at once.

    python benchmarks/batch_dependence.py [--epochs 10]
    python benchmarks/batch_dependence.py --main-job [--iters 150]

``--main-job``: the timeseries task's model after ``--iters`` Adam iterations, its test accuracy
evaluated in batches of 512 and of 10, per setting.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import snopt_dyn
from snopt_dyn import datasets
from snopt_dyn.estimators import NeuralCDEClassifier, preprocessing


def main_job(iters: int) -> None:
    from snopt_dyn.compare.tasks import get_task

    task = get_task("timeseries").prepare("cpu")
    model = task.make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lrs["adam"])
    gen = torch.Generator().manual_seed(0)
    for _ in range(iters):
        optimizer.zero_grad()
        task.loss(model, torch.randperm(task.n_train, generator=gen)[:task.batch_size]).backward()
        optimizer.step()
    for mode, tol in ((False, None), ("eval", None), ("eval", 1e-4), ("eval", 1e-5), (False, 1e-5)):
        snopt_dyn.wrap(model, per_sample_error=mode, eval_tol=tol)
        cells = []
        for batch in (512, 10):
            task.eval_batch = batch
            start = time.perf_counter()
            cells.append(f"batch {batch}: {task.evaluate(model):.4f} ({time.perf_counter() - start:.2f} s)")
        print(f"{'per-sample' if mode else 'joint':10} tol {tol or 'model (1e-3)'}:  " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--main-job", action="store_true")
    parser.add_argument("--iters", type=int, default=150)
    args = parser.parse_args()
    if args.main_job:
        return main_job(args.iters)
    train, test = datasets.load_japanese_vowels("train"), datasets.load_japanese_vowels("test")
    clf = NeuralCDEClassifier(max_epochs=args.epochs, early_stopping=False, random_state=0, verbose=0)
    clf.fit(train.as_lists()[0], train.labels.numpy())
    x = preprocessing.cde_coefficients(test, clf.scaling_)
    model = clf.model_.eval()
    probes = torch.arange(0, len(x), 19)
    gen = torch.Generator().manual_seed(1)
    tens = [torch.randint(0, len(x), (9,), generator=gen) for _ in probes]
    hundreds = [torch.randperm(len(x), generator=gen)[:99] for _ in probes]
    print(f"accuracy {np.mean(clf.predict(test.as_lists()[0]) == test.labels.numpy()):.4f}; {len(probes)} probe series")
    for tol in (1e-3, 1e-4, 1e-5):
        for mode in (False, "eval"):
            snopt_dyn.wrap(model, per_sample_error=mode, eval_tol=tol)
            with torch.no_grad():
                snopt_dyn.nfe.reset()
                start = time.perf_counter()
                whole = model(x).softmax(-1)[probes]
                seconds, nfe = time.perf_counter() - start, snopt_dyn.nfe.forward
                alone = torch.cat([model(x[i:i + 1]).softmax(-1) for i in probes])
                ten = torch.cat([model(x[torch.cat([i.view(1), c])]).softmax(-1)[:1] for i, c in zip(probes, tens)])
                hundred = torch.cat([model(x[torch.cat([i.view(1), c])]).softmax(-1)[:1]
                                     for i, c in zip(probes, hundreds)])
            p = torch.stack([whole, alone, ten, hundred])
            spread = float((p.max(0).values - p.min(0).values).max())
            flips = int((p.argmax(-1) != p[0].argmax(-1)).any(0).sum())
            name = "per-sample" if mode else "joint"
            print(f"tol {tol:.0e} {name:10}  max spread {spread:.4f}  flips {flips}  "
                  f"whole test set: NFE {nfe}, {seconds:.2f} s")


if __name__ == "__main__":
    main()
