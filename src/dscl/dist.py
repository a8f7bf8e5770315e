"""Everything that touches ``torch.distributed``.

Every function is an identity (or the obvious single-process answer) when no process group exists,
so the training loop has one code path for a CPU, one GPU, or many processes under ``torchrun`` or
SLURM's ``srun`` (one task per process; :func:`slurm_environment` turns SLURM's variables into
torchrun's). Collectives carry no gradient: they are used for momentum keys, labels and metrics only.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as tdist
from torch import nn

from dscl.errors import LaunchError


def is_dist() -> bool:
    """True when a process group is initialised and has more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    """torchrun's variables ask for more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_distributed() -> bool:
    """This process is one of several: started by torchrun, or a task of a multi-task ``srun`` step
    (:func:`slurm_environment`). :func:`init` then joins the process group."""
    return launched_by_torchrun() or slurm_environment(os.environ) is not None


# ----------------------------------------------------------------------------------------------
# SLURM: `srun python -m dscl ...` with one task per process

#: Variables that mean torchrun (or whoever set them) launched this process: they win over SLURM's.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: ``DSCL_SLURM=0``: ignore SLURM's variables, every task of an srun step runs alone (independent runs).
SLURM_SWITCH = "DSCL_SLURM"
#: Where a SLURM task finds its step's node list, first found wins: the step's own list, then the
#: names ``srun`` also sets (``--preserve-env`` leaves them at the job's list).
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: ``10000 + job_id % 20000``. Every task of the job computes
    the same one without talking to the others; the range stays below Linux's ephemeral ports
    (32768+), and two jobs sharing a node collide only when their ids differ by a multiple of 20000."""
    return 10000 + job_id % 20000


def _slurm_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None or not value.strip().isdigit():
        found = "is not set" if value is None else f"is {value!r}, not a non-negative integer"
        raise LaunchError(f"{name} {found}, but SLURM_STEP_NUM_TASKS={env.get('SLURM_STEP_NUM_TASKS')} says this "
                         f"process is one task of a multi-task srun step; start dscl with `srun python -m dscl ...` "
                         f"(or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself)")
    return int(value)


def slurm_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """torchrun's variables for a task of a multi-task ``srun`` step, derived from SLURM's; None when
    the process is not one (it then runs alone, or under torchrun, exactly as before).

    None when torchrun's variables are set (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``: torchrun, also
    torchrun started by an sbatch script, wins), when ``SLURM_STEP_NUM_TASKS`` is absent (``srun`` sets
    it for the tasks of a step; the batch script's own shell, where ``SLURM_NTASKS`` may still say 8,
    is not a task of a step: ``python -m dscl classify`` there stays one process), for a one-task
    step, and with ``DSCL_SLURM=0`` (every task an independent run). Otherwise: ``RANK`` =
    ``SLURM_PROCID``, ``WORLD_SIZE`` = ``SLURM_STEP_NUM_TASKS`` (what ``srun`` also puts in
    ``SLURM_NTASKS``), ``LOCAL_RANK`` = ``SLURM_LOCALID``, ``LOCAL_WORLD_SIZE`` = this node's entry of
    ``SLURM_STEP_TASKS_PER_NODE`` (omitted when that cannot be read), ``MASTER_ADDR`` = the first host
    of the step's node list (where SLURM's block and cyclic distributions put task 0) and
    ``MASTER_PORT`` = :func:`slurm_port` of ``SLURM_JOB_ID``; a ``MASTER_ADDR`` / ``MASTER_PORT``
    already set is kept.

    Raises:
        LaunchError: a variable the rendezvous needs is missing or malformed (the message names it).
    """
    if (any(name in env for name in TORCHRUN_VARIABLES) or "SLURM_STEP_NUM_TASKS" not in env
            or env.get(SLURM_SWITCH, "").strip() == "0"):
        return None
    world = _slurm_int(env, "SLURM_STEP_NUM_TASKS")
    if world <= 1:
        return None
    rank, local_rank = _slurm_int(env, "SLURM_PROCID"), _slurm_int(env, "SLURM_LOCALID")
    if rank >= world:
        raise LaunchError(f"SLURM_PROCID={rank} is not below SLURM_STEP_NUM_TASKS={world}")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)}
    local_world = _tasks_on_this_node(env)
    if local_world is not None:
        out["LOCAL_WORLD_SIZE"] = str(max(local_world, local_rank + 1))
    if env.get("MASTER_ADDR"):
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    else:
        name = next((n for n in NODELIST_VARIABLES if env.get(n)), None)
        if name is None:
            raise LaunchError(f"none of {', '.join(NODELIST_VARIABLES)} is set: dscl takes the rendezvous host "
                             f"(MASTER_ADDR) from the step's node list; set MASTER_ADDR yourself")
        out["MASTER_ADDR"] = first_host(env[name], variable=name)
    if env.get("MASTER_PORT"):
        out["MASTER_PORT"] = env["MASTER_PORT"]
    else:
        job = next((env[n] for n in ("SLURM_JOB_ID", "SLURM_JOBID") if env.get(n)), None)
        if job is None or not job.strip().isdigit():
            raise LaunchError(f"SLURM_JOB_ID is {'not set' if job is None else repr(job)}: dscl derives the "
                             f"rendezvous port from it; set MASTER_PORT yourself")
        out["MASTER_PORT"] = str(slurm_port(int(job)))
    return out


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    """This node's task count from ``SLURM_STEP_TASKS_PER_NODE`` (or ``SLURM_TASKS_PER_NODE``) and
    ``SLURM_NODEID``; None when either is missing or does not parse."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = env.get("SLURM_NODEID", "")
    if not spec or not node.strip().isdigit():
        return None
    try:
        counts = tasks_per_node(spec)
    except ValueError:
        return None
    return counts[int(node)] if int(node) < len(counts) else None


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed per-node task counts, one entry per node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``.

    Raises:
        ValueError: ``spec`` is not a comma list of ``N`` / ``N(xK)``.
    """
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LaunchError(f"{spec!r} is not a SLURM tasks-per-node list like 2(x3),1")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


_Piece = str | tuple[tuple[int, int, int], ...]  # literal text, or a bracket group's ranges (low, high, width)


def _hostlist_entries(nodelist: str, variable: str) -> list[list[_Piece]]:
    """Parse a SLURM hostlist into entries (split at commas outside brackets), each a list of pieces."""

    def bad(why: str) -> LaunchError:
        return LaunchError(f"{variable}={nodelist!r} is not a SLURM host list ({why}); expected names like "
                          f"gpu[01-03,07],cpu5")

    entries: list[list[_Piece]] = []
    pieces: list[_Piece] = []
    pos, text = 0, ""
    while pos <= len(nodelist):
        ch = nodelist[pos] if pos < len(nodelist) else ","  # a comma at the end closes the last entry
        if ch == ",":
            if text:
                pieces.append(text)
            if not pieces:
                raise bad("an empty name")
            entries.append(pieces)
            pieces, text = [], ""
            pos += 1
        elif ch == "[":
            end = nodelist.find("]", pos)
            if end < 0 or "[" in nodelist[pos + 1:end]:
                raise bad("a '[' without its ']'")
            if text:
                pieces.append(text)
                text = ""
            ranges = []
            for part in nodelist[pos + 1:end].split(","):
                m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
                if m is None:
                    raise bad(f"{part!r} in brackets is not N or N-M")
                low, high = int(m.group(1)), int(m.group(2) or m.group(1))
                if high < low:
                    raise bad(f"the range {part.strip()} runs backwards")
                ranges.append((low, high, len(m.group(1))))
            pieces.append(tuple(ranges))
            pos = end + 1
        elif ch == "]":
            raise bad("a ']' without its '['")
        elif ch.isspace():
            raise bad("a space")
        else:
            text += ch
            pos += 1
    return entries


def _expand(pieces: list[_Piece]) -> Iterator[str]:
    if not pieces:
        yield ""
        return
    head, rest = pieces[0], pieces[1:]
    heads = [head] if isinstance(head, str) else (f"{i:0{w}d}" for lo, hi, w in head for i in range(lo, hi + 1))
    for h in heads:
        for tail in _expand(rest):
            yield h + tail


def hostnames(nodelist: str, *, variable: str = "SLURM_NODELIST") -> Iterator[str]:
    """Every host of a SLURM hostlist, in its order (what ``scontrol show hostnames`` prints), lazily.

    ``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03 gpu07 cpu5. Zero padding follows the range's first
    number (``[08-10]`` -> 08 09 10, ``[8-10]`` -> 8 9 10); several bracket groups in one name expand
    as a product (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2); text after a group is kept.

    Raises:
        ValueError: ``nodelist`` is not a hostlist (the message names ``variable``).
    """
    for pieces in _hostlist_entries(nodelist, variable):
        yield from _expand(pieces)


def first_host(nodelist: str, *, variable: str = "SLURM_NODELIST") -> str:
    """The first host of a SLURM hostlist (``gpu[01-03,07],cpu5`` -> ``gpu01``) without expanding the rest.

    Raises:
        ValueError: ``nodelist`` is not a hostlist.
    """
    return next(hostnames(nodelist, variable=variable))


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU a process of a multi-process run drives, among the ``visible`` ones: ``local_rank``,
    or 0 when it sees exactly one (SLURM's ``--gpus-per-task=1`` / ``--gpu-bind`` hide the others;
    that GPU is then this task's own).

    Raises:
        RuntimeError: ``local_rank`` has no GPU of its own among several visible ones.
    """
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={devices})" if devices is not None else ""
    raise LaunchError(f"LOCAL_RANK={local_rank} but this process sees {visible} GPUs{shown}: start at most one "
                       f"process per visible GPU on each node, or give each SLURM task its own GPU "
                       f"(--gpus-per-task=1)")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``--device`` rule of every command: ``auto`` = ``cuda`` when torch sees a GPU, else ``cpu``;
    any other name (``cpu``, ``cuda``, ``cuda:1``, ...) or a ``torch.device`` as given.

    Raises:
        RuntimeError: a CUDA device was asked for but torch sees no CUDA GPU.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LaunchError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu")
    return dev


def init(device: str = "auto") -> torch.device:
    """Pick the device (:func:`resolve_device`) and, when this process is one of several, join the
    process group: under torchrun (``WORLD_SIZE`` > 1), or as a task of a multi-task ``srun`` step,
    whose SLURM variables are first turned into torchrun's (:func:`slurm_environment`, written to
    ``os.environ`` so that everything after, and the processes this one starts, sees one scheme).

    Backend: nccl when each process drives a GPU, gloo on the CPU. ``LOCAL_RANK`` chooses the GPU
    among the visible ones, or GPU 0 when a process sees only one (:func:`cuda_index`). Multi-node
    torchrun runs use torchrun's own rendezvous flags (``--nnodes``, ``--rdzv-endpoint``); nothing
    here needs to know about them.
    """
    dev = resolve_device(device)
    if launched_distributed() and not tdist.is_initialized():
        slurm = slurm_environment(os.environ)
        if slurm is not None:
            os.environ.update(slurm)
            if slurm["RANK"] == "0":
                print(f"dscl: {slurm['WORLD_SIZE']} processes from SLURM's variables (srun), rendezvous at "
                      f"{slurm['MASTER_ADDR']}:{slurm['MASTER_PORT']}", file=sys.stderr, flush=True)
        if dev.type == "cuda":
            local = cuda_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    elif dev.type == "cuda" and dev.index is not None and not launched_distributed():
        # --device cuda:N: make GPU N the current device, so that pinned memory, the CUDA RNG state saved
        # and restored with checkpoints, and any tensor made with device="cuda" belong to it, not GPU 0
        torch.cuda.set_device(dev.index)
    return dev


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        tdist.barrier()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor, *, equal_sizes: bool = False) -> torch.Tensor:
    """Concatenate ``x`` (N_r, ...) from every rank along dim 0, rank order; N_r may differ.

    ``equal_sizes=True`` is the caller's promise that every rank passes the same shape (stage 1's
    fixed per-rank batch): one collective and no read-back of the sizes, so a GPU step never waits
    for the host. A broken promise is a backend error or a hang, so only pass it when it holds.
    """
    if not is_dist():
        return x
    if equal_sizes:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    tdist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    top = max(counts)
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in counts]
    tdist.all_gather(out, padded.contiguous())
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)])


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place and returned)."""
    if is_dist():
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (in place and returned)."""
    if is_dist():
        tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
    return x


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks with one flat all-reduce (identity in a single process).

    We reduce by hand instead of wrapping the encoder in DistributedDataParallel because one step
    runs the online encoder twice (global view and patches) before a single backward.
    """
    if not is_dist():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


@torch.no_grad()
def average_batchnorm_stats(module: nn.Module) -> None:
    """Give every rank the pooled BatchNorm running statistics of all ranks (identity in one process).

    Ranks that normalise with statistics of their own shard of the data drift apart, and features
    computed on different ranks are then normalised differently. Pooling (rather than broadcasting
    rank 0's) keeps every rank's images in the estimate: running_mean becomes the mean over ranks and
    running_var the variance of the equal-weight mixture, mean_r(var_r + mean_r^2) - mean^2 (reduced
    in float64: the difference cancels digits). num_batches_tracked becomes the maximum.
    """
    if not is_dist():
        return
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None and m.running_var is not None]
    if not bns:
        return
    means = torch.cat([m.running_mean.double() for m in bns])  # type: ignore[union-attr]
    second = torch.cat([m.running_var.double() for m in bns]) + means * means  # type: ignore[union-attr]
    flat = torch.cat([means, second])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat /= world_size()
    mean, second = flat[: means.numel()], flat[means.numel():]
    var = (second - mean * mean).clamp_min(0.0)
    offset = 0
    for m in bns:
        n = m.running_mean.numel()  # type: ignore[union-attr]
        m.running_mean.copy_(mean[offset : offset + n])  # type: ignore[union-attr]
        m.running_var.copy_(var[offset : offset + n])  # type: ignore[union-attr]
        offset += n
    counts = torch.stack([m.num_batches_tracked for m in bns if m.num_batches_tracked is not None])
    if counts.numel():
        tdist.all_reduce(counts, op=tdist.ReduceOp.MAX)
        for m, c in zip((m for m in bns if m.num_batches_tracked is not None), counts, strict=True):
            m.num_batches_tracked.copy_(c)  # type: ignore[union-attr]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank hold rank ``src``'s parameters and buffers."""
    if not is_dist():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        tdist.broadcast(t.data, src=src)


@torch.no_grad()
def shuffled_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """MoCo's shuffle-BN: run ``fn`` on a random cross-rank permutation of the global batch.

    BatchNorm statistics of the momentum encoder then come from a different subset of images than
    the query encoder's, which stops the model from cheating through BN. With one process this is
    a plain ``fn(x)`` (no shuffle is possible or needed). Assumes equal per-rank batches.
    """
    if not is_dist():
        return fn(x)
    b = x.shape[0]
    full = all_gather_cat(x, equal_sizes=True)
    perm = torch.randperm(full.shape[0], device=x.device)
    tdist.broadcast(perm, src=0)
    r = rank()
    mine = perm[r * b : (r + 1) * b]
    out_local = fn(full[mine])
    out_full = all_gather_cat(out_local, equal_sizes=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return out_full[inverse[r * b : (r + 1) * b]]


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if not is_dist():
        return [obj]
    out: list[object] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
