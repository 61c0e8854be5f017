"""SNOpt on a latent ODE (Chen et al. 2018 / Rubanova et al. 2019): a VAE over JapaneseVowels series.

The model is :class:`snopt_dyn.models.LatentODE`, written the way torchdiffeq's ``latent_ode``
example is: a GRU encoder gives q(z0), ``torchdiffeq.odeint`` integrates z0 over the observation
times, an MLP decodes.  Half of the observations are dropped (irregular sampling); the loss is the
negative ELBO on the observed points only.  Two lines make it second order:

    model = snopt_dyn.wrap(model)        # the torchdiffeq solve now runs on the engine adjoint
    precond.step()                       # between loss.backward() and optimizer.step()

Run:  python examples/latent_ode.py  [--iters 150] [--device cuda]   (~30 s on 2 CPU cores)
"""
import argparse
import time

import torch
from torch import nn

import snopt_dyn
from snopt_dyn.datasets import drop_observations, load_japanese_vowels
from snopt_dyn.models import LatentODE


def load(split, length=26):
    data = drop_observations(load_japanese_vowels(split, standardize=True), 0.5, seed=0)
    x = torch.nan_to_num(data.values[:, :length])     # dropped points are masked out of the loss
    return x, data.mask[:, :length]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of the base SGD")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny model: one thread is fastest, above all on a shared machine
    device = torch.device(args.device)

    (x_train, m_train), (x_test, m_test) = load("train"), load("test")
    x_train, m_train, x_test, m_test = (t.to(device) for t in (x_train, m_train, x_test, m_test))
    t = 0.1 * torch.arange(x_train.shape[1], dtype=torch.float32, device=device)  # observation times

    model = LatentODE(obs_dim=x_train.shape[-1], latent_dim=6, rtol=1e-3, atol=1e-3, noise_std=0.5)
    model = snopt_dyn.wrap(model).to(device)                         # <- one call
    # the GRU encoder is not a Linear/Conv layer: leave it to the base optimizer (no warning)
    precond = snopt_dyn.SNOpt(model, damping=0.05, update_freq=25, num_samples=10, skip=[nn.GRU])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    def test_mse():
        model.eval()
        with torch.no_grad():
            pred, _, _ = model(x_test, t)
            err = ((pred - x_test) ** 2).mean(-1)
        model.train()
        return (err * m_test).sum().item() / m_test.sum().item()

    start = time.perf_counter()
    for it in range(1, args.iters + 1):
        index = torch.randint(len(x_train), (args.batch_size,), device=device)
        loss = model.elbo(x_train[index], t, mask=m_train[index]) / m_train[index].sum(1).float().mean()
        optimizer.zero_grad()
        loss.backward()
        precond.step()                                               # <- one line
        optimizer.step()
        if it % 25 == 0 or it == 1:
            print(f"iter {it:4d}  -ELBO per observation {loss.item():7.3f}  test reconstruction MSE "
                  f"{test_mse():.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"done: test reconstruction MSE {test_mse():.3f} (standardised units; predicting 0 gives ~1)")


if __name__ == "__main__":
    main()
