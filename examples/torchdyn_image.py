"""SNOpt on a torchdyn Neural ODE image classifier: a 4,000/1,000 MNIST subset shipped with snopt-dyn.

An ordinary torchdyn model -- conv stem, ``NeuralODE`` with a conv vector field, pooling, Linear head.
Two lines make it second order:

    model = snopt_dyn.wrap(model)        # every NeuralODE inside now solves on the engine adjoint
    precond.step()                       # between loss.backward() and optimizer.step()

Run:  python examples/torchdyn_image.py  [--iters 80] [--device cuda]   (under a minute on 2 CPU cores)
"""
import argparse
import time

import torch
from torch import nn
from torchdyn.core import NeuralODE

import snopt_dyn
from snopt_dyn.datasets import load_mnist_subset


class ConvField(nn.Module):
    def __init__(self, channels=8, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, t, x, args=None):
        return torch.tanh(self.conv2(nn.functional.softplus(self.conv1(x))))


class LastState(nn.Module):
    """Solve on t in [0, 1] and keep the final state (torchdyn returns the whole trajectory)."""

    def __init__(self, node):
        super().__init__()
        self.node = node
        self.register_buffer("t_span", torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return self.node(x, self.t_span)[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(1)  # small model: one thread is fastest, above all on a shared machine
    device = torch.device(args.device)

    x_train, y_train = (t.to(device) for t in load_mnist_subset("train"))  # (4000, 1, 28, 28) in [0, 1]
    x_test, y_test = (t.to(device) for t in load_mnist_subset("test"))

    node = NeuralODE(ConvField(), solver="dopri5", sensitivity="adjoint", rtol=1e-3, atol=1e-3,
                     return_t_eval=False)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Softplus(),  # 28x28 -> 14x14
                          LastState(node), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, 10))
    model = snopt_dyn.wrap(model).to(device)                         # <- one call
    precond = snopt_dyn.SNOpt(model, damping=0.05, update_freq=50, sample_step=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)         # SNOpt preconditions plain SGD

    def accuracy():
        model.eval()
        with torch.no_grad():
            correct = sum((model(x_test[i:i + 250]).argmax(-1) == y_test[i:i + 250]).sum().item()
                          for i in range(0, len(y_test), 250))
        model.train()
        return correct / len(y_test)

    start = time.perf_counter()
    for it in range(1, args.iters + 1):
        index = torch.randint(len(y_train), (args.batch_size,), device=device)
        loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        precond.step()                                               # <- one line
        optimizer.step()
        if it % 20 == 0 or it == 1:
            evals = f"{snopt_dyn.nfe.forward} forward / {snopt_dyn.nfe.backward} backward"
            print(f"iter {it:4d}  loss {loss.item():.3f}  test acc {100 * accuracy():5.1f}%  "
                  f"({time.perf_counter() - start:.0f} s; solver evaluations in this iteration: {evals})",
                  flush=True)
        snopt_dyn.nfe.reset()
    print(f"done: test accuracy {100 * accuracy():.1f}% after {args.iters} iterations")


if __name__ == "__main__":
    main()
