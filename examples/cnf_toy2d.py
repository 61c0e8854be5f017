"""SNOpt on a continuous normalizing flow (FFJORD-style) for a 2-D toy density: two concentric circles.

The data are generated here with a fixed seed (synthetic, like the paper's Circle set): points on
circles of radius 1 and 2 (half each) with Gaussian radial noise.  The model is
:class:`snopt_dyn.models.cnf.CNF` -- ``ConcatSquashLinear`` layers, tanh, exact trace (cheap in
2-D), ``torchdiffeq.odeint_adjoint`` -- and two lines make it second order:

    model = snopt_dyn.wrap(model)        # the torchdiffeq solve now runs on the engine adjoint
    precond.step()                       # between loss.backward() and optimizer.step()

It trains for ``--seconds`` of wall clock (default 60) and writes a PNG with the data, the learned
density and samples from the flow; the path is printed at the end.

Run:  python examples/cnf_toy2d.py  [--seconds 60] [--out snopt-dyn-results/cnf_toy2d.png]
"""
import argparse
import math
import os
import time

import torch

import snopt_dyn
from snopt_dyn.models.cnf import CNF


def circles(n: int, generator: torch.Generator, noise: float = 0.08) -> torch.Tensor:
    """``n`` points on two concentric circles (radius 1 and 2) with radial Gaussian noise."""
    radius = 1.0 + (torch.rand(n, generator=generator) < 0.5).float()
    radius = radius + noise * torch.randn(n, generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall clock")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate of the base SGD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("snopt-dyn-results", "cnf_toy2d.png"),
                        help="where the picture goes (default: snopt-dyn-results/cnf_toy2d.png, git-ignored)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small model: one thread is fastest on a shared machine
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    test = circles(2000, gen)

    model = CNF(2, (32, 32, 32), trace="exact", T=1.0, rtol=1e-4, atol=1e-4)
    model = snopt_dyn.wrap(model)                                   # <- one call
    precond = snopt_dyn.SNOpt(model, damping=0.05, update_freq=25, num_samples=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    def test_nll() -> float:
        with torch.no_grad():
            return -model(test).mean().item()

    print(f"test NLL before training: {test_nll():.3f} nats")
    clock, it, start = 0.0, 0, time.perf_counter()
    while clock < args.seconds:
        x = circles(args.batch_size, gen)
        tic = time.perf_counter()
        optimizer.zero_grad()
        loss = -model(x).mean()
        loss.backward()
        precond.step()                                              # <- one line
        optimizer.step()
        clock += time.perf_counter() - tic
        it += 1
        if it % 25 == 0:
            print(f"iter {it:4d}  train-clock {clock:5.1f} s  batch NLL {loss.item():.3f}  test NLL {test_nll():.3f}")
    print(f"trained {it} iterations in {clock:.1f} s of training clock ({time.perf_counter() - start:.1f} s wall); "
          f"test NLL {test_nll():.3f} nats")
    path = plot(model, test, args.out, it, clock)
    print(f"wrote {path}")


def plot(model: CNF, data: torch.Tensor, path: str, iters: int, clock: float) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim, n = 3.0, 100
    axis = torch.linspace(-lim, lim, n)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    with torch.no_grad():
        density = model(grid).exp().reshape(n, n)
        samples = model.sample(2000, generator=torch.Generator().manual_seed(1))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    axes[0].scatter(data[:, 0], data[:, 1], s=2, alpha=0.5)
    axes[0].set_title("data (two circles)")
    axes[1].imshow(density.numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis")
    axes[1].set_title("learned density")
    axes[2].scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, color="tab:orange")
    axes[2].set_title("samples from the flow")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"CNF trained with SNOpt + SGD: {iters} iterations, {clock:.0f} s on CPU")
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.abspath(path)


if __name__ == "__main__":
    main()
