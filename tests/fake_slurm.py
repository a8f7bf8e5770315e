"""Stand-ins for SLURM's ``sbatch`` / ``squeue`` / ``sacct`` / ``scontrol`` / ``srun`` (tests/test_launch.py).

Each records its arguments (one JSON line per call in ``$FAKE_DIR/calls.jsonl``) and keeps the jobs in
``$FAKE_DIR/jobs.json`` (``{id: {"state", "exit", "array_job", "task"}}``):

* ``sbatch FILE`` gives the next job id (from 1000), one per array element (``--array=0-N``); with
  ``FAKE_RUN=1`` it also runs each element in the background like SLURM would (after the jobs of
  ``--dependency=afterok:...`` completed; a failed dependency cancels it as ``--kill-on-invalid-dep=yes``
  asks), with SLURM's variables, and records COMPLETED / FAILED and the exit code. Without it the jobs stay
  PENDING until a test writes their state.
* ``squeue -h -r -u USER -o %i|%T``: the jobs that are PENDING / RUNNING; ``sacct -X -n -P -o
  JobID,State,ExitCode -j IDS``: the others (``FAKE_NO_SACCT=1``: accounting disabled).
* ``scontrol requeue ID``: PENDING again (recorded); ``srun OPTIONS CMD``: runs CMD as the one task, its
  output in ``--output`` / ``--error`` (SLURM's %A %a %j %t filled in).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

DIR = Path(os.environ.get("FAKE_DIR", "."))
TOOLS = ("sbatch", "squeue", "sacct", "scontrol", "srun")


def install(bin_dir: Path) -> None:
    """Write the five commands into ``bin_dir`` (each runs this file with the current Python)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        path = bin_dir / tool
        path.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {tool} \"$@\"\n")
        path.chmod(0o755)


class Jobs:
    """``jobs.json`` under a lock (several stand-ins may run at once)."""

    def __enter__(self) -> dict:
        self.fh = open(DIR / "jobs.lock", "w")  # noqa: SIM115
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        path = DIR / "jobs.json"
        self.jobs = json.loads(path.read_text()) if path.is_file() else {}
        return self.jobs

    def __exit__(self, *exc) -> None:
        (DIR / "jobs.json").write_text(json.dumps(self.jobs, indent=1))
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _sbatch_options(text: str) -> dict[str, str]:
    opts = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line.strip())
        if m:
            opts[m.group(1)] = (m.group(2) or "").strip("'\"")
    return opts


def sbatch(args: list[str]) -> int:
    script = Path(args[-1])
    opts = _sbatch_options(script.read_text())
    with Jobs() as jobs:
        first = 1000 + len({k.split("_")[0] for k in jobs})
        if "array" in opts:
            lo, hi = opts["array"].split("%")[0].split("-")
            ids = [f"{first}_{i}" for i in range(int(lo), int(hi) + 1)]
        else:
            ids = [str(first)]
        for i, jid in enumerate(ids):
            jobs[jid] = {"state": "PENDING", "exit": "0:0", "array_job": str(first) if "array" in opts else None,
                         "task": i if "array" in opts else None, "script": str(script), "options": opts}
    print(f"Submitted batch job {first}")
    if os.environ.get("FAKE_RUN"):
        for jid in ids:
            subprocess.Popen([sys.executable, __file__, "_run", jid], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


def _run_job(jid: str) -> int:
    """One job's life: wait for its dependencies, run the batch script, record the outcome."""
    with Jobs() as jobs:
        job = jobs[jid]
    deps = [d for d in job["options"].get("dependency", "").replace("afterok:", "").split(":") if d]
    while deps:
        with Jobs() as jobs:
            states = [jobs.get(d, {}).get("state") for d in deps]
        if all(s == "COMPLETED" for s in states):
            break
        if any(s in ("FAILED", "CANCELLED") for s in states):
            with Jobs() as jobs:
                jobs[jid].update(state="CANCELLED", exit="0:0")
            return 0
        time.sleep(0.2)
    with Jobs() as jobs:
        jobs[jid]["state"] = "RUNNING"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    own = str(90000 + int(jid.split("_")[0]) * 10 + (job["task"] or 0))
    env.update(SLURM_JOB_ID=own if job["array_job"] else jid, SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost", SLURM_SUBMIT_DIR=os.getcwd())
    if job["array_job"]:
        env.update(SLURM_ARRAY_JOB_ID=job["array_job"], SLURM_ARRAY_TASK_ID=str(job["task"]))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    rc = subprocess.run(["bash", job["script"]], env=env, **quiet).returncode
    with Jobs() as jobs:
        if jobs[jid]["state"] == "RUNNING":  # not requeued meanwhile
            jobs[jid].update(state="COMPLETED" if rc == 0 else "FAILED", exit=f"{rc}:0")
    return 0


def _fill(pattern: str) -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return (pattern.replace("%A", array or "").replace("%a", task or "")
            .replace("%j", os.environ.get("SLURM_JOB_ID", "")).replace("%t", "0"))


def srun(args: list[str]) -> int:
    out = err = None
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] in ("--output", "--error"):
            if args[i] == "--output":
                out = _fill(args[i + 1])
            else:
                err = _fill(args[i + 1])
            i += 2
        else:
            i += 1
    env = {**os.environ, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "1",
           "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "1"}
    for path in (out, err):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(out or os.devnull, "a") as fo, open(err or os.devnull, "a") as fe:
        return subprocess.run(args[i:], env=env, stdout=fo, stderr=fe).returncode


def squeue(args: list[str]) -> int:
    with Jobs() as jobs:
        for jid, job in jobs.items():
            if job["state"] in ("PENDING", "RUNNING", "REQUEUED"):
                print(f"{jid}|{job['state']}")
    return 0


def sacct(args: list[str]) -> int:
    if os.environ.get("FAKE_NO_SACCT"):
        print("sacct: error: Slurm accounting storage is disabled", file=sys.stderr)
        return 1
    wanted = set(args[args.index("-j") + 1].split(","))
    with Jobs() as jobs:
        for jid, job in jobs.items():
            if jid.split("_")[0] in wanted:
                print(f"{jid}|{job['state']}|{job['exit']}")
    return 0


def scontrol(args: list[str]) -> int:
    if args[:1] == ["requeue"]:
        with Jobs() as jobs:
            if args[1] in jobs:
                jobs[args[1]]["state"] = "PENDING"
    return 0


def main(argv: list[str]) -> int:
    tool, args = argv[0], argv[1:]
    if tool == "_run":
        return _run_job(args[0])
    with open(DIR / "calls.jsonl", "a") as fh:
        fh.write(json.dumps([tool, *args]) + "\n")
    return {"sbatch": sbatch, "squeue": squeue, "sacct": sacct, "scontrol": scontrol, "srun": srun}[tool](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
