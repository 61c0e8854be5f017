"""SNOpt on a torchcde Neural CDE: UEA JapaneseVowels (12 channels, 9 speakers), shipped with snopt-dyn.

The model is the canonical torchcde one (Kidger et al. 2020) -- nothing in it knows about SNOpt.
Two lines make it second order:

    model = snopt_dyn.wrap(model)        # the CDE solve now runs on the O(1)-memory engine adjoint
    precond.step()                       # between loss.backward() and optimizer.step()

Run:  python examples/torchcde_timeseries.py  [--iters 60] [--device cuda]   (under a minute on 2 CPU cores)
"""
import argparse
import time

import torch
import torchcde
from torch import nn

import snopt_dyn
from snopt_dyn.datasets import load_japanese_vowels, with_time_channel


class CDEFunc(nn.Module):
    """f(z): an MLP whose last Linear is reshaped to (hidden, channels)."""

    def __init__(self, channels, hidden, width=64):
        super().__init__()
        self.channels, self.hidden = channels, hidden
        self.linear1 = nn.Linear(hidden, width)
        self.linear2 = nn.Linear(width, hidden * channels)

    def forward(self, t, z):
        z = torch.tanh(self.linear2(torch.relu(self.linear1(z))))
        return z.view(*z.shape[:-1], self.hidden, self.channels)


class NeuralCDE(nn.Module):
    def __init__(self, channels, hidden, classes):
        super().__init__()
        self.initial = nn.Linear(channels, hidden)
        self.func = CDEFunc(channels, hidden)
        self.readout = nn.Linear(hidden, classes)

    def forward(self, coeffs):
        X = torchcde.CubicSpline(coeffs)
        z0 = self.initial(X.evaluate(X.interval[0]))
        z = torchcde.cdeint(X=X, func=self.func, z0=z0, t=X.interval, adjoint=True,
                            method="dopri5", rtol=1e-3, atol=1e-3)
        return self.readout(z[:, -1])


def spline_coeffs(split, length=29):
    data = load_japanese_vowels(split, standardize=True)
    x = with_time_channel(data, time_scale=length - 1)              # time is channel 0
    x = torch.cat([x, x[:, -1:].expand(-1, length - x.shape[1], -1)], 1)  # pad: train 26 -> 29 steps
    return torchcde.hermite_cubic_coefficients_with_backward_differences(x), data.labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny model: one thread is fastest, above all on a shared machine
    device = torch.device(args.device)

    (x_train, y_train), (x_test, y_test) = spline_coeffs("train"), spline_coeffs("test")
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))

    model = NeuralCDE(channels=x_train.shape[-1] // 4, hidden=32, classes=9)
    model = snopt_dyn.wrap(model).to(device)                         # <- one call
    precond = snopt_dyn.SNOpt(model, damping=0.05, update_freq=50, sample_step=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)         # SNOpt preconditions plain SGD

    def accuracy():
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
        model.train()
        return acc

    start = time.perf_counter()
    for it in range(1, args.iters + 1):
        index = torch.randint(len(y_train), (args.batch_size,), device=device)
        loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        precond.step()                                               # <- one line
        optimizer.step()
        if it % 10 == 0 or it == 1:
            print(f"iter {it:4d}  loss {loss.item():.3f}  test acc {100 * accuracy():5.1f}%  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"done: test accuracy {100 * accuracy():.1f}% after {args.iters} iterations; "
          f"SNOpt refreshed its curvature {precond.diagnostics()['refreshes']} times")


if __name__ == "__main__":
    main()
