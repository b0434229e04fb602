"""Work on many in-memory items spread over this machine's cores, in order (a process pool).

Why a standard-library process pool and not Ray tasks: its callers (measuring the training
images' properties when a sampler is fitted, at the end of training or in jobs/fit_sampler.py;
the evaluation; the ranking of a sweep) run in a job's driver, often with no Ray at all, on
arrays already in memory; a pool needs no cluster, and the driver holds no Ray resources that
it would have to share. Processes, not threads: the work (:mod:`ray_galaxy.morphology`) is many
small numpy calls that hold the GIL.

Forked (on Linux), not spawned: a spawned worker imports the job's main module and torch again
(4-8 s per pool on 2 cores, measured; more than measuring 600 images takes), and a script
that calls this without an ``if __name__ == "__main__"`` guard would break in its workers. A
fork starts in milliseconds. Its known hazard is a lock held by another thread at the fork
(the driver has torch's and Ray's threads): the workers run only numpy and scipy on the items
they are sent, and never call into torch, Ray or gRPC, whose locks those are. Elsewhere than
Linux, where fork is unsafe or missing, the items are worked through in this process.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNKS_PER_WORKER = 4  # chunks handed to each worker: evens out items that take longer


def cores() -> int:
    """The CPU cores this process may run on (its affinity, which honours taskset and cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _apply(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [fn(item) for item in items]


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None,
                min_items: int = 1) -> list[R]:
    """``[fn(item) for item in items]``, computed on ``workers`` processes (None: :func:`cores`)
    when there are at least ``min_items`` items (below that a pool's start, a fresh interpreter
    per worker, costs more than it saves), else in this process.

    ``fn`` must be a module-level function and the items picklable. The results come back in
    the order of ``items`` (the chunks are mapped in order), so they do not depend on
    ``workers``. A daemonic process, which may not start children, works alone, as does any
    process not on Linux (module docstring)."""
    n = len(items)
    if workers is None:
        workers = cores() if n >= min_items else 1
    workers = min(workers, n)
    if workers <= 1 or multiprocessing.current_process().daemon or not sys.platform.startswith("linux"):
        return _apply(fn, items)
    chunk = max(1, math.ceil(n / (workers * CHUNKS_PER_WORKER)))
    parts = [items[i:i + chunk] for i in range(0, n, chunk)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return [r for part in pool.map(_apply, [fn] * len(parts), parts) for r in part]
