"""One rank of a small 2 x 2 job that injects a fault on one rank: ``python -m tests.fault_worker MODE RANK``.

The test starts four of these with torchrun's variables set. The faulty rank prints ``FAULT <time>``
just before the fault; every rank runs its layers under ``health.run_or_exit``, as ``epruntime run``
does. Modes: ``kill`` (SIGKILL itself), ``raise`` (feed a wrong dtype), ``hang`` (sleep inside a
stage), ``nan`` (a NaN in its input with ``runtime.check_finite`` on).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from epruntime import EPMoE, init_runtime
from epruntime.layer.probe import StageMarks
from epruntime.parallel.health import run_or_exit, stage
from tests.factories import make_config, tokens

TIMEOUT_S = 6.0
FAULT_AT = 3


def main(mode: str, fault_rank: int, iters: int = 20) -> None:
    cfg = make_config(2, 2, runtime={"timeout_s": TIMEOUT_S, "check_finite": mode == "nan"})
    rt = init_runtime(cfg)
    layer = EPMoE.random(cfg.model, rt, seed=0)
    layer.layer_idx = 7
    layer.probe = StageMarks()  # as epruntime run installs: failures name the layer and the stage

    def job() -> None:
        for i in range(iters):
            x = tokens(16, cfg.model.hidden_size, 100 * i + rt.rank)
            if i == FAULT_AT and rt.rank == fault_rank:
                print(f"FAULT {time.time():.3f}", flush=True)
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif mode == "raise":
                    x = x.double()
                elif mode == "hang":
                    with stage("layer 7 > dispatch (simulated hang)"):
                        time.sleep(600)
                elif mode == "nan":
                    x[0, 0] = float("nan")
            layer(x)

    run_or_exit(job)
    print(f"rank {rt.rank} finished", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]))
