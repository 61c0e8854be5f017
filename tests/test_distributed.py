"""Two gloo processes on localhost, half a batch each, equal one process on the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import snopt_dyn


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 3)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(z)))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.field, self.head = nn.Linear(4, 3), Field(), nn.Linear(3, 2)

    def forward(self, x):
        z = snopt_dyn.odeint_adjoint(self.field, self.enc(x), torch.tensor([0.0, 1.0], dtype=x.dtype),
                                     rtol=1e-10, atol=1e-10)
        return self.head(z[-1])


def _problem():
    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 2, dtype=torch.float64)
    return model, x, y


def _preconditioned_grads(model, precond, x, y, iters, sync=None):
    """Run ``iters`` iterations of SGD; return the preconditioned grads of the last one."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(iters):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if sync:
            sync(model)
        precond.step()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return grads


def _average_grads(model):  # what DDP does
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def _worker(rank, world, port, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, y = _problem()
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=5)
        grads = _preconditioned_grads(model, precond, xs, ys, 3, sync=_average_grads)
        torch.save(grads, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_one_rank_on_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model, x, y = _problem()
    precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=5)
    want = _preconditioned_grads(model, precond, x, y, 3)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
