"""Run the dpsynth CLI and SIGKILL it in the middle of its K-th durable write.

    python tests/fault_inject.py K dpsynth-args...

Every durable write in dpsynth goes through `rundir.atomic_write_bytes` (temp file, fsync,
rename). At the K-th fsync this cuts the temp file to half its length and kills the
process with SIGKILL, so the rename never happens: exactly what a crash or power loss in
the middle of writing that file leaves behind. Nothing else is changed.
"""

import os
import signal
import sys

if __name__ == "__main__":
    kill_at = int(sys.argv[1])
    calls = 0
    real_fsync = os.fsync

    def fsync_then_die(fd):
        global calls
        calls += 1
        if calls == kill_at:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)

    os.fsync = fsync_then_die
    from dpsynth.cli.main import run

    sys.argv = ["dpsynth", *sys.argv[2:]]
    run()
