"""Runs the real ``dscl`` command line in this process and sends the process a real signal at a chosen
moment: ``PREEMPT_SIGNAL`` (SIGTERM / SIGUSR1) right after stage-1 step ``PREEMPT_AT_STEP`` of this
process (1-based, counted from the start of this process), or, with ``PREEMPT_STAGE=2``, when stage 2
starts training its classifier. ``PREEMPT_RANK``: only that rank signals itself (torchrun).
``PREEMPT_CLOSE_SECONDS``: closing the trackers at the end takes that long (W&B's finish takes seconds),
so a signal repeated meanwhile lands on the way out.

Usage: python preempt_worker.py <dscl arguments...>   (exit code: dscl's)
"""

import os
import signal
import sys


def main() -> int:
    sig = getattr(signal, os.environ.get("PREEMPT_SIGNAL", "SIGTERM"))
    only = os.environ.get("PREEMPT_RANK")

    def fire() -> None:
        if only is None or int(os.environ.get("RANK", "0")) == int(only):
            os.kill(os.getpid(), sig)  # delivered to the handler dscl installed, like the scheduler's

    if os.environ.get("PREEMPT_STAGE", "1") == "1":
        import dscl.pretrain as pre

        at, calls, real_step = int(os.environ["PREEMPT_AT_STEP"]), [0], pre.Stage1.step

        def step(self, batch, lr):
            parts = real_step(self, batch, lr)
            calls[0] += 1
            if calls[0] == at:
                fire()
            return parts

        pre.Stage1.step = step
    else:
        import dscl.classify as cls

        real_train = cls.train_linear_cached

        def train(*args, **kwargs):
            fire()
            return real_train(*args, **kwargs)

        cls.train_linear_cached = train
    close_seconds = float(os.environ.get("PREEMPT_CLOSE_SECONDS", "0"))
    if close_seconds:
        import time

        import dscl.trackers as trackers

        real_close = trackers.close_all

        def close_all() -> None:
            time.sleep(close_seconds)
            real_close()

        trackers.close_all = close_all
    from dscl.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
