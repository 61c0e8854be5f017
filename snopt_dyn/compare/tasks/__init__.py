"""The benchmark tasks of ``snopt-dyn compare``: one module per task, real vendored data.

Every task builds its model the way a user of torchcde / torchdyn / torchdiffeq / torchsde writes it and then
calls :func:`snopt_dyn.wrap` on it, so ``compare`` measures exactly what a user gets.  A task knows its
data, model, loss, test metric and the comparison's *defaults* (batch size, budget, each optimizer's
tuned learning rate); ``TUNING`` records how the defaults were chosen.  torchcde, torchdyn and torchsde
are imported only by the task that needs them.
"""
from __future__ import annotations

from typing import Callable, Dict

from . import flow, image, latent, sde, timeseries
from .base import Task, TaskError
from .timeseries import load_series

__all__ = ["Task", "TaskError", "TASKS", "TUNING", "get_task", "load_series"]

#: ``name -> make_task(data)`` for every task of the main job.
TASKS: Dict[str, Callable[[str], Task]] = {
    "timeseries": timeseries.make_task, "image": image.make_task, "latent": latent.make_task, "flow": flow.make_task,
    "sde": sde.make_task}

#: How each task's default learning rates were chosen (same protocol for every method: one interleaved
#: ``snopt-dyn compare`` process per sweep, 40 s of training clock per run, learning rates on a ~3x grid
#: extended until the best was inside it, judged by the mean test metric over the last third of the run).
TUNING: Dict[str, str] = {"timeseries": timeseries.TUNING, "image": image.TUNING, "latent": latent.TUNING,
                          "flow": flow.TUNING, "sde": sde.TUNING}


def get_task(name: str, data: str = "") -> Task:
    """A fresh, unprepared task by name; ``data`` picks the data set where the task allows it."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](data or "")
