"""The worker group of a training run: which nodes it is on, how it changed since the last
group (a node lost, preempted or joined), and the line rank 0 prints about it.

Train restarts the whole group after a failure, a preemption or an elastic resize; rank 0 of
the new group compares its nodes with the last group's, recorded in the run folder
(``workers.json``), and says what changed in one line.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ray
import ray.train
import torch.distributed as dist

from ray_galaxy.console import log

GROUP_FILE = "workers.json"  # the nodes of the run's current worker group


def _group_record_path() -> tuple[Any, str]:
    """(filesystem, path) of the run's ``workers.json``. Train's storage context is a
    DeveloperAPI; it is the one place that knows the run folder on any filesystem (local, S3)."""
    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, f"{storage.experiment_fs_path}/{GROUP_FILE}"


def _read_group_record() -> dict[str, Any]:
    fs, path = _group_record_path()
    try:
        with fs.open_input_stream(path) as f:
            return dict(json.loads(f.read().decode()))
    except (OSError, ValueError, TypeError):
        return {}


def _write_group_record(record: dict[str, Any]) -> None:
    fs, path = _group_record_path()
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(record).encode())


def swap_group_record(node_ids: list[str]) -> dict[str, Any]:
    """Record this worker group's nodes in the run's folder (``workers.json``) and give the
    previous group's record (its ``node_ids``, and the ones it saw ``preempted``): a group that
    failed before its first checkpoint still ran, and the next one's line should say what
    changed since it."""
    previous = _read_group_record()
    _write_group_record({"node_ids": node_ids})
    return previous


def check_preemption(rank: int, node_ids: list[str], announced: list[str], epoch: int) -> list[str]:
    """Once per epoch on every rank (Train's preemption query is a barrier): when a node of the
    group is being drained as a preemption (a spot reclaim), rank 0 says so once and records it,
    so the next group's line says 'preempted'. The epoch's checkpoint has just been reported: it
    is what training resumes from. Gives the nodes announced so far."""
    info = ray.train.get_preemption_info()
    if info is None or set(info.preempted_node_ids) <= set(announced):
        return announced
    announced = sorted(set(announced) | set(info.preempted_node_ids))
    if rank == 0:
        left = f" within {max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s" if info.deadline_ms else ""
        log(f"node {', '.join(n[:8] for n in info.preempted_node_ids)} is being preempted{left}: checkpoint "
            f"after epoch {epoch + 1} saved; when the node goes, training resumes from the latest checkpoint "
            "on the nodes that are left")
        _write_group_record({"node_ids": node_ids, "preempted": announced})
    return announced


def group_line(node_ids: list[str], before: dict[str, Any] | None = None) -> str:
    """What the worker group is, and how it differs from the checkpoint's group ``before``:
    'workers 2 -> 1: node 5f3a1c9e lost; resuming from checkpoint after epoch 5'."""
    def nodes(ids: Any) -> str:
        return ", ".join(sorted(str(i)[:8] for i in ids))

    if not before:
        return f"workers: {len(node_ids)} on {len(set(node_ids))} node(s) ({nodes(set(node_ids))})"
    old = list(before.get("node_ids") or [])
    gone, joined = set(old) - set(node_ids), set(node_ids) - set(old)
    preempted = gone & set(before.get("preempted") or [])
    changes = ([f"node {nodes(preempted)} preempted"] if preempted else []) + \
              ([f"node {nodes(gone - preempted)} lost"] if gone - preempted else []) + \
              ([f"node {nodes(joined)} joined"] if joined else [])
    head = f"workers {len(old)} -> {len(node_ids)}" if old and len(old) != len(node_ids) else f"workers: {len(node_ids)}"
    return (head + (": " + ", ".join(changes) if changes else "") + f"; resuming from checkpoint after epoch "
            f"{before['epoch']}" + (" (with its critic)" if before.get("with_critic") else ""))


def group_node_ids(world: int) -> list[str]:
    """The node of every rank (placement is part of what a run did, recorded with the metrics)."""
    node_id = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node_id]
    ids: list[Any] = [None] * world
    dist.all_gather_object(ids, node_id)
    return ids
