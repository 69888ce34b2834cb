"""A torchrun worker that runs the dpsynth CLI and SIGKILLs one rank at its K-th step boundary.

    torchrun --nproc-per-node 2 tests/kill_rank.py -- RANK K dpsynth-args...

Every rank of a multi-process finetune calls `training.distributed.any_rank` once per logical
step (to agree on a stop request); on rank RANK its K-th call kills the process instead,
which is what a crashed node or an OOM-killed worker does. Nothing else is changed.
"""

import os
import signal
import sys

if __name__ == "__main__":
    victim, kill_at = int(sys.argv[1]), int(sys.argv[2])
    from dpsynth.training import distributed

    if int(os.environ.get("RANK", "0")) == victim:
        real_any_rank = distributed.any_rank
        calls = 0

        def any_rank_then_die(flag):
            global calls
            calls += 1
            if calls == kill_at:
                sys.stderr.write(f"killing rank {victim} at step boundary {kill_at}\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_any_rank(flag)

        distributed.any_rank = any_rank_then_die
    from dpsynth.cli.main import run

    sys.argv = ["dpsynth", *sys.argv[3:]]
    run()
