"""Shared test settings: one torch thread (the models are small; on 2 shared cores more threads only
add contention and make timings erratic)."""
import torch

torch.set_num_threads(1)
