"""Sweeps: a grid of independent cells, each one task whose result (a few named tidy frames) is cached by
its configuration, like every other table.

    results = sweep.run(measure, cells)                          # in this process, one cell after another
    results = sweep.run(measure, cells, ray_address="local")     # a Ray started here, one task per cell
    LLFC_RAY_ADDRESS=auto python -m llfc_core run ...             # the Ray cluster this machine belongs to

`measure(cell) -> {name: DataFrame}` must be a module-level function (Ray ships it by reference: the
workers import llfc_core) and `cell` a JSON-able dict. Cached cells are read, not sent anywhere; the
driver writes each result to the cache as it arrives, so an interrupted sweep resumes where it stopped.
The engine is Ray (the optional extra `pip install -e ".[sweep]"`); nothing here schedules by itself.
Either way the frames returned are read back from the cache, so both engines return identical tables.
"""
from __future__ import annotations

import os
from typing import Callable

from .. import cache
from ..runtime import configure_threads, progress

KIND = "sweep"  # cache folder of the cells' results


def cell_config(measure: Callable, cell: dict) -> dict:
    return {"measure": f"{measure.__module__}.{measure.__qualname__}", "cell": cell}


def run(measure: Callable, cells: list[dict], *, ray_address: str | None = None, num_cpus: float = 1,
        num_gpus: float = 0.0, desc: str = "sweep") -> list[dict]:
    """Every cell's frames, in the order of `cells`. `ray_address`: None (default: $LLFC_RAY_ADDRESS,
    else in-process), 'local' (start Ray on this machine, or use the one this process already started)
    or a cluster address ('auto', 'ray://head:10001'). Each Ray task asks for `num_cpus` CPUs and
    `num_gpus` of a GPU (a fraction lets several small trainings share one GPU)."""
    address = ray_address if ray_address is not None else os.environ.get("LLFC_RAY_ADDRESS") or None
    configs = [cell_config(measure, c) for c in cells]
    results = [cache.read_frames(KIND, c) for c in configs]
    todo = [i for i, r in enumerate(results) if r is None]
    bar = progress(total=len(todo), desc=f"{desc} ({len(cells) - len(todo)} of {len(cells)} cached)", leave=False)
    outcomes = (_on_ray(measure, cells, todo, address, num_cpus, num_gpus) if address and todo
                else ((i, measure(cells[i])) for i in todo))
    for i, frames in outcomes:
        cache.write_frames(KIND, configs[i], frames)
        results[i] = cache.read_frames(KIND, configs[i])
        bar.update(1)
    bar.close()
    return results


def start_ray(address: str = "local", num_cpus: int | None = None):
    """Connect this process to Ray (once): 'local' starts one here (`num_cpus`: how many CPUs it may use,
    default all), anything else is a cluster address. The workers get this process's LLFC_* settings."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("sweeps on Ray need the optional extra: pip install -e \".[sweep]\" "
                          f"(asked for Ray at {address!r})") from e
    if not ray.is_initialized():
        local = address == "local"
        ray.init(address=None if local else address, num_cpus=num_cpus if local else None,
                 runtime_env={"env_vars": _forwarded_env()}, include_dashboard=False, log_to_driver=False)
    return ray


def _forwarded_env() -> dict:
    """The llfc settings (cache, data, device, threads...) the workers must share with the driver."""
    return {k: v for k, v in os.environ.items() if k.startswith("LLFC_") and k != "LLFC_RAY_ADDRESS"}


def _on_ray(measure: Callable, cells: list[dict], todo: list[int], address: str, num_cpus: float, num_gpus: float):
    """Yield (index, frames) as Ray tasks finish."""
    ray = start_ray(address)
    task = ray.remote(_remote_cell).options(num_cpus=num_cpus, num_gpus=num_gpus)
    pending = {task.remote(measure, cells[i], num_cpus): i for i in todo}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done[0]), ray.get(done[0])


def _remote_cell(measure: Callable, cell: dict, num_cpus: float) -> dict:
    """One cell on a Ray worker, with as many torch threads as CPUs the task asked for."""
    configure_threads(max(1, int(num_cpus)))
    return measure(cell)
