"""Run under torchrun with 2 gloo processes by tests/test_rundir.py: ``prepare_run_dir(overwrite=True)``
where rank 1 looks at the directory only after rank 0 has deleted the old run files (issue #11 item 2).

Every rank must take the same branch and pass the same barriers, so the collective after it pairs up.
"""

import datetime
import sys
import time
from pathlib import Path

import torch.distributed as tdist

from dscl import dist
from dscl.run import prepare_run_dir


def main(out: str, marker: str) -> None:
    # a short timeout turns a mismatched collective into an error instead of a 30-minute hang
    tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.rank()
    if rank == 1:
        time.sleep(2.0)  # rank 0 deletes the old files in this time
    prepare_run_dir(out, resume=False, overwrite=True)
    seen = dist.gather_objects(("after prepare_run_dir", rank))
    if rank == 0:
        assert seen == [("after prepare_run_dir", 0), ("after prepare_run_dir", 1)], seen
        Path(marker).write_text(" ".join(sorted(p.name for p in Path(out).iterdir())))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
