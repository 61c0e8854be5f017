"""Training the integration horizon T of a torchdyn Neural ODE together with its weights (SNOpt §2.5).

A digit classifier (sklearn's 8x8 digits, shipped with snopt-dyn): Linear encoder, a torchdyn
``NeuralODE`` on ``t_span = [0, T]``, Linear head.  ``wrap(..., train_terminal_time=True)`` gives the
NeuralODE a trainable horizon T (exact dL/dT from the engine adjoint), and
``snopt_dyn.TerminalTimeOptimizer`` moves it with the second-order feedback policy (or plain
gradient descent, ``--policy gradient``, the first-order baseline).  T settles where the loss gained
by a longer horizon balances the ``reg * T**2 / 2`` penalty; a larger ``--reg`` buys a shorter
horizon, i.e. fewer solver evaluations per iteration (printed), for some accuracy.

    model = snopt_dyn.wrap(model, train_terminal_time=True, terminal_time=1.0)
    loss.backward(); precond.step(); optimizer.step(); horizon.step()

Run:  python examples/trainable_horizon.py  [--iters 200] [--reg 0.05] [--policy gradient]   (~15 s on 2 CPU cores)
"""
import argparse
import time

import torch
from torch import nn
from torchdyn.core import NeuralODE

import snopt_dyn
from snopt_dyn.datasets import load_digits


class Field(nn.Module):
    def __init__(self, dim=32, width=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, x, args=None):
        return self.net(x)


class LastState(nn.Module):
    def __init__(self, node):
        super().__init__()
        self.node = node
        self.register_buffer("t_span", torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return self.node(x, self.t_span)[-1]   # the wrapped NeuralODE stretches t_span to [0, T]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--reg", type=float, default=1e-3, help="weight of the T**2/2 penalty")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--policy", default="feedback", choices=["feedback", "gradient"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny model: one thread is fastest, above all on a shared machine
    device = torch.device(args.device)

    x_train, y_train = (t.to(device) for t in load_digits("train", flatten=True))  # (1347, 64)
    x_test, y_test = (t.to(device) for t in load_digits("test", flatten=True))

    node = NeuralODE(Field(), solver="dopri5", sensitivity="adjoint", rtol=1e-3, atol=1e-3, return_t_eval=False)
    model = nn.Sequential(nn.Linear(64, 32), LastState(node), nn.Linear(32, 10))
    model = snopt_dyn.wrap(model, train_terminal_time=True, terminal_time=1.0).to(device)
    precond = snopt_dyn.SNOpt(model, damping=0.05, update_freq=50, num_samples=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    horizon = snopt_dyn.TerminalTimeOptimizer(model, lr=0.1, reg=args.reg, update_freq=25, policy=args.policy)

    def accuracy():
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
        model.train()
        return acc

    start, evals = time.perf_counter(), 0
    for it in range(1, args.iters + 1):
        index = torch.randint(len(y_train), (args.batch_size,), device=device)
        before = snopt_dyn.nfe.total
        loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        precond.step()
        optimizer.step()
        horizon.step()                  # after the weights' step: it uses the step they just took
        evals = snopt_dyn.nfe.total - before
        if it % 50 == 0 or it == 1:
            T = float(next(iter(horizon.horizons.values())))
            print(f"iter {it:4d}  loss {loss.item():.3f}  T {T:.3f}  solver evals/iter {evals:3d}  "
                  f"test acc {100 * accuracy():5.1f}%  ({time.perf_counter() - start:.0f} s)", flush=True)
    history = next(iter(horizon.history.values()))
    print(f"done ({args.policy} policy): T {history[0]:.2f} -> {history[-1]:.2f}, "
          f"test accuracy {100 * accuracy():.1f}%")


if __name__ == "__main__":
    main()
