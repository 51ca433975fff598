"""Run a function on every rank of a real gloo world made of local processes.

``run_world(fn, cfg, *args)`` starts ``cfg.topology.world_size`` processes (forkserver, so each
starts from a clean interpreter with torch preloaded), sets torchrun's environment variables,
calls ``init_runtime(cfg)`` and then ``fn(rt, *args)`` in each, and returns the per-rank results in
rank order. A failure on any rank raises with that rank's traceback; a hang fails after a deadline.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from epruntime.config.schema import Config, config_from_dict, config_to_dict

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "epruntime", "epruntime.models"])  # transformers once, not per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(payload: bytes, rank: int, port: int, results: Any) -> None:
    # Tensors travel as plain pickled bytes: torch's fd-sharing reductions run out of descriptors.
    fn, cfg_dict, args = pickle.loads(payload)
    world = cfg_dict["topology"]["nnodes"] * cfg_dict["topology"]["ranks_per_node"]
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        from epruntime.parallel.runtime import init_runtime, shutdown_runtime

        torch.set_num_threads(1)
        rt = init_runtime(config_from_dict(cfg_dict))
        out = fn(rt, *args)
        shutdown_runtime()
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_world(fn: Callable, cfg: Config, *args: Any, deadline_s: float = 180.0) -> list[Any]:
    """Call ``fn(rt, *args)`` on every rank of ``cfg``'s topology; return the results by rank."""
    world = cfg.topology.world_size
    results = _CTX.Queue()
    port = _free_port()
    payload = pickle.dumps((fn, config_to_dict(cfg), args))
    procs = [_CTX.Process(target=_worker, args=(payload, r, port, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(outputs) < world:
            try:
                rank, status, value = results.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                missing = sorted(set(range(world)) - set(outputs))
                raise TimeoutError(f"ranks {missing} did not finish within {deadline_s}s") from None
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            outputs[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [outputs[r] for r in range(world)]
