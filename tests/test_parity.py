"""Parity: one stage-1 step of dscl under ``--profile official`` IS the paper's step.

Why this file exists. The official code encodes each of the L patch slots with its own forward of
the online encoder (METHOD.md A.9 step 3): in training mode BatchNorm normalises every slot's B crops
with that slot's own batch statistics, and the running statistics are updated L + 1 times per step
(query first, then slots 1..L). dscl batches the L*B crops into one forward for speed and emulates the
per-slot statistics (``model.patch_bn="per-slot"``); a joint forward would silently train another
model. This file checks the whole step, not just that detail, against a reference written from
METHOD.md (A.3-A.9, G) alone: a plain, slow implementation with the official network (torchvision
ResNet-18 with the MoCo-v2 MLP as ``fc`` and a forward hook on ``layer4``), one forward per slot, the
official roi_align call, the DSCL loss in the official beta form with dense masks, PBSD with a detached
teacher, a hand-written SGD step and the FIFO queue.

What is compared, after several steps from the same weights and the same full random queue, fed the
same crops, boxes and labels:

* online and momentum parameters, as the relative norm ||theta_dscl - theta_ref|| / ||theta_ref -
  theta_0|| (the error measured against what the steps changed; a norm relative to theta itself would
  hide a wrong update behind the large initial weights);
* BatchNorm running statistics of both encoders, per buffer tensor relative to that tensor's change
  from its start (same reasoning; per tensor, so that one wrong layer is not averaged away by the
  others), and num_batches_tracked exactly (it counts the forwards: 1 + L per step online, 1 momentum);
* the queue (features relative to the rows written, rows never written and all labels exactly, ptr);
* the per-step losses (loss, loss_con, loss_pbsd).

Negative controls run the same comparison on models that differ from the paper in one convention
(``patch_bn="joint"``, ``roi_aligned=True``, and both, i.e. dscl's own defaults) and require the
differences to be at least 100x the tolerance, so a comparison that always passes is caught.

The two-process test (gloo on the CPU, ``tests/parity_worker.py`` under torchrun) adds MoCo's
shuffle-BN for the keys, gradient averaging over ranks, per-rank BatchNorm buffers and the gathered
enqueue; the reference then plays both ranks in one process.

Run with ``pytest -s tests/test_parity.py`` to see the measured differences.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import roi_align

from dscl.backbones import build_backbone
from dscl.config import LossConfig, load_config
from dscl.model import DSCLModel, Encoder, build_model
from dscl.pretrain import Batch, pretrain_step

HERE = Path(__file__).parent

# The setting: small enough for a 2-core CPU, large enough that every part of the step is exercised
# (a 2x2 layer4 map at 64 px for roi_align, a 1x1 map for the 32 px patches, same-class positives in the
# batch and in the queue with 4 classes, several queue writes).
BATCH, SLOTS, QUEUE, DIM, CLASSES = 8, 5, 64, 128, 4
IMAGE, PATCH = 64, 32
STEPS = 5
LR = 0.002  # small: at a large lr, float-level differences grow quickly on random data
EMA_M = 0.9  # a visible EMA step: at m = 0.99 the key weights move ~1% as much, close to float32 rounding
ALPHA, TAU, PBSD_WEIGHT = 1 / 9, 0.07, 1.5
BETA = (1 - ALPHA) / ALPHA  # the official --contrastive_beta 8 (METHOD.md A.6)
SGD_MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
TOL = 1e-4  # relative tolerance of every compared quantity
CONTROL_FACTOR = 100  # a negative control must differ by at least this many tolerances

OVERRIDES = ["model.backbone=resnet18", f"model.queue_size={QUEUE}", f"model.dim={DIM}",
             "model.channels_last=false", f"views.num_patches={SLOTS}"]
LOSS_CFG = LossConfig(loss="dscl", alpha=ALPHA, temperature=TAU, pbsd_weight=PBSD_WEIGHT)


# ------------------------------------------------------------------------------------------------
# The reference, from METHOD.md only
# ------------------------------------------------------------------------------------------------

class Layer4Hook:
    """Forward hook keeping the last output of ``layer4`` (the official code's ROI feature source)."""

    def __init__(self) -> None:
        self.map: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.map = output


def reference_encoder() -> nn.Module:
    """METHOD.md A.3 at ResNet-18 size: torchvision ResNet with zero-init residuals, fc = MoCo-v2 MLP."""
    net = torchvision.models.resnet18(weights=None, zero_init_residual=True)
    net.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, DIM))
    return net


def reference_name(dscl_name: str) -> str:
    """dscl Encoder tensor name -> reference network name (backbone.X -> X, head.N -> fc.N)."""
    if dscl_name.startswith("backbone."):
        return dscl_name[len("backbone."):]
    if dscl_name.startswith("head."):
        return "fc." + dscl_name[len("head."):]
    raise KeyError(dscl_name)


def encoder_state(model_state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The reference-named state of encoder ``prefix`` ("online." or "momentum.") of a DSCLModel state."""
    return {reference_name(k[len(prefix):]): v.clone() for k, v in model_state.items() if k.startswith(prefix)}


def dscl_reference_loss(q: Tensor, k: Tensor, y: Tensor, queue: Tensor, queue_y: Tensor) -> Tensor:
    """L_dscl in the official beta form (METHOD.md A.6 "Official implementation", G 1-9), anchor by anchor.

    Contrast set cat(q, k, queue) with labels cat(y, y, queue_y); the anchors are the queries. For anchor
    i the self column is out of numerator and denominator; positives are the other same-label columns:
    the own key (weight 1) and P_i (weight beta/|P_i| each); the weighted mean of the log-probabilities is
    divided by the sum of the weights (1 + beta, or 1 when P_i is empty).
    """
    n = q.shape[0]
    feats = torch.cat([q, k, queue])
    labels = torch.cat([y, y, queue_y])
    logits = q @ feats.T / TAU
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # the official stabiliser (a no-op in value)
    per_anchor = []
    for i in range(n):
        not_self = torch.ones(feats.shape[0], dtype=torch.bool)
        not_self[i] = False
        log_prob = logits[i] - torch.log(torch.exp(logits[i][not_self]).sum())
        others = (labels == y[i]) & not_self
        others[n + i] = False  # the own key is weighted apart
        weights = torch.zeros(feats.shape[0])
        weights[n + i] = 1.0
        if others.any():
            weights[others] = BETA / others.sum()
        per_anchor.append(-(weights * log_prob).sum() / weights.sum())
    return torch.stack(per_anchor).mean()


def pbsd_reference_loss(c: Tensor, s: Tensor, k: Tensor, queue: Tensor) -> Tensor:
    """L_pbsd of one slot (METHOD.md A.7, G 10): mean over images of CE(softmax teacher, log_softmax student)
    over [own key, queue], teacher detached."""
    per_image = []
    for i in range(c.shape[0]):
        bank = torch.cat([k[i : i + 1], queue])
        target = torch.softmax(bank @ c[i] / TAU, dim=0).detach()
        log_student = torch.log_softmax(bank @ s[i] / TAU, dim=0)
        per_image.append(-(target * log_student).sum())
    return torch.stack(per_image).mean()


class Reference:
    """The paper's stage-1 step played for ``world`` ranks in one process (``world`` = 1: no shuffle).

    Parameters are shared by the ranks, so every rank's networks hold the same parameter values; each
    rank has its own BatchNorm running buffers (``q[r]``, ``k[r]``), as real processes would.
    """

    def __init__(self, model_state: dict[str, Tensor], world: int) -> None:
        self.world = world
        self.q = [reference_encoder() for _ in range(world)]
        self.k = [reference_encoder() for _ in range(world)]
        self.hooks = [Layer4Hook() for _ in range(world)]
        for q, k, hook in zip(self.q, self.k, self.hooks, strict=True):
            q.load_state_dict(encoder_state(model_state, "online."))  # strict: every tensor mapped
            k.load_state_dict(encoder_state(model_state, "momentum."))
            for p in k.parameters():
                p.requires_grad_(False)
            q.layer4.register_forward_hook(hook)
            q.train()
            k.train()
        self.queue = model_state["queue.features"].clone()
        self.queue_labels = model_state["queue.labels"].clone()
        self.ptr = int(model_state["queue.ptr"])
        self.written = torch.zeros(QUEUE, dtype=torch.bool)
        self.sgd_buffers: dict[str, Tensor] = {}
        self.losses: list[list[dict[str, float]]] = []  # [step][rank]

    def step(self, data: dict[str, Tensor], lr: float, m: float, perm: Tensor | None = None) -> None:
        """One step on the global batch ``data``; rank r trains on its rows r*b..(r+1)*b-1.

        ``perm`` (world > 1): the shuffle-BN permutation; rank r's momentum encoder runs on the global
        key images ``perm[r*b:(r+1)*b]``.
        """
        n = data["query"].shape[0]
        b = n // self.world
        rows = [slice(r * b, (r + 1) * b) for r in range(self.world)]
        queue, queue_labels = self.queue.clone(), self.queue_labels.clone()  # before this step's enqueue
        zs, teachers, students = [], [], []
        for r in range(self.world):
            net, hook = self.q[r], self.hooks[r]
            # (1) query forward; the hook keeps layer4's map U
            zs.append(F.normalize(net(data["query"][rows[r]]), dim=1))
            u = hook.map
            # (2) the teacher of each slot: roi_align as the official call, mean over the 2x2 bins, fc
            c = []
            for j in range(SLOTS):
                boxes = [data["boxes"][i, j].view(1, 4) for i in range(rows[r].start, rows[r].stop)]
                pooled = roi_align(u, boxes, output_size=(2, 2), spatial_scale=1 / 32, sampling_ratio=-1,
                                   aligned=False)
                c.append(F.normalize(net.fc(pooled.mean(dim=(2, 3))), dim=1))
            teachers.append(c)
            # (3) one forward per slot: BatchNorm sees that slot's b crops only
            students.append([F.normalize(net(data["patches"][rows[r], j]), dim=1) for j in range(SLOTS)])
        # (4) EMA of the parameters (buffers are the key encoders' own), then the keys
        with torch.no_grad():
            # theta_k <- m theta_k + (1 - m) theta_q, in place (METHOD.md A.3). The test runs m = 0.9 so
            # that theta_k's 5-step change is well above float32 rounding: at m = 0.99 it moves ~1% of
            # theta_q's update and an equally exact spelling (`pk * m + pq * (1 - m)`, one more
            # rounding) already measured 2.1e-4 against 1.2e-5 for this one.
            for name, pk in self.k[0].named_parameters():
                pk.mul_(m).add_(self.q[0].get_parameter(name), alpha=1 - m)
            for other in self.k[1:]:
                for name, pk in other.named_parameters():
                    pk.copy_(self.k[0].get_parameter(name))
            if self.world == 1:
                keys = F.normalize(self.k[0](data["key"]), dim=1)
            else:
                assert perm is not None
                shuffled = torch.cat([F.normalize(self.k[r](data["key"][perm[rows[r]]]), dim=1)
                                      for r in range(self.world)])  # row t is the key of image perm[t]
                keys = torch.empty_like(shuffled)
                keys[perm] = shuffled
        # (5) each rank's losses over its own queries/keys and the global queue
        total = torch.zeros(())
        step_losses = []
        for r in range(self.world):
            y, k_r = data["labels"][rows[r]], keys[rows[r]]
            loss_con = dscl_reference_loss(zs[r], k_r, y, queue, queue_labels)
            loss_pbsd = torch.stack([pbsd_reference_loss(teachers[r][j], students[r][j], k_r, queue)
                                     for j in range(SLOTS)]).mean()
            loss = loss_con + PBSD_WEIGHT * loss_pbsd
            step_losses.append({name: float(value.detach()) for name, value in
                                (("loss", loss), ("loss_con", loss_con), ("loss_pbsd", loss_pbsd))})
            total = total + loss / self.world  # rank r's parameter copy gets grad(loss_r) / world
        self.losses.append(step_losses)
        # (6) backward, hand-written SGD on the mean gradient (PyTorch's convention), enqueue
        total.backward()
        with torch.no_grad():
            for name, p in self.q[0].named_parameters():
                g = sum(q.get_parameter(name).grad for q in self.q)
                d = g + WEIGHT_DECAY * p
                if name not in self.sgd_buffers:
                    self.sgd_buffers[name] = d.clone()
                else:
                    self.sgd_buffers[name] = SGD_MOMENTUM * self.sgd_buffers[name] + d
                p -= lr * self.sgd_buffers[name]
            for q in self.q:
                for name, p in q.named_parameters():
                    p.grad = None
                    if q is not self.q[0]:
                        p.copy_(self.q[0].get_parameter(name))
            assert QUEUE % n == 0
            self.queue[self.ptr : self.ptr + n] = keys
            self.queue_labels[self.ptr : self.ptr + n] = data["labels"]
            self.written[self.ptr : self.ptr + n] = True
            self.ptr = (self.ptr + n) % QUEUE


# ------------------------------------------------------------------------------------------------
# Data, runs and comparisons
# ------------------------------------------------------------------------------------------------

def make_batches(seed: int = 1234) -> list[dict[str, Tensor]]:
    """STEPS random global batches: images, patches, boxes (x1, y1, x2, y2) inside the query, labels."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        size = 8 + torch.rand(BATCH, SLOTS, 2, generator=g) * (IMAGE - 8)  # box width, height in [8, 64)
        corner = torch.rand(BATCH, SLOTS, 2, generator=g) * (IMAGE - size)
        batches.append({
            "query": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),
            "key": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),
            "patches": torch.randn(BATCH, SLOTS, 3, PATCH, PATCH, generator=g),
            "boxes": torch.cat([corner, corner + size], dim=2),
            "labels": torch.randint(0, CLASSES, (BATCH,), generator=g),
        })
    return batches


def official_model() -> DSCLModel:
    cfg = load_config("smoke", overrides=OVERRIDES, profile="official")
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES)
    assert (model.patch_bn, model.roi_aligned) == ("per-slot", False)
    assert len(model.queue) == QUEUE and model.queue._ptr == 0  # the official full random queue
    return model


def run_dscl(model: DSCLModel, batches: list[dict[str, Tensor]]) -> list[dict[str, float]]:
    model.train()
    opt = torch.optim.SGD(model.online.parameters(), lr=0.0, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    losses = []
    for data in batches:
        parts = pretrain_step(model, Batch(**data), opt, lr=LR, m=EMA_M, loss_cfg=LOSS_CFG, num_classes=CLASSES)
        losses.append({k: float(v) for k, v in parts.items()})
    return losses


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _relative(got: list[Tensor], ref: list[Tensor], start: list[Tensor]) -> float:
    """||got - ref|| / ||ref - start|| over the concatenation."""
    return float((_flat(got) - _flat(ref)).norm() / (_flat(ref) - _flat(start)).norm())


def compare(state: dict[str, Tensor], losses: list[dict[str, float]], ref: Reference, rank: int,
            initial: dict[str, Tensor]) -> dict[str, float]:
    """Every compared quantity of a dscl model state (rank ``rank``) against the reference.

    Returns relative differences (see the module docstring); exact checks are returned as 0.0 (equal)
    or inf (different) so that one dict tells the whole story.
    """
    out: dict[str, float] = {}
    for prefix, nets in (("online.", ref.q), ("momentum.", ref.k)):
        net = nets[rank]
        ref_state = net.state_dict()
        names = {n: reference_name(n[len(prefix):]) for n in state if n.startswith(prefix)}
        params = [n for n, r in names.items() if r in dict(net.named_parameters())]
        out[prefix + "params"] = _relative([state[n] for n in params], [ref_state[names[n]] for n in params],
                                           [initial[n] for n in params])
        # Running statistics: each buffer tensor against its own change from the start (running_mean
        # starts at 0, running_var at 1), worst tensor reported. The change is what the steps' batch
        # statistics put there; a norm relative to the buffer itself would let running_var's initial
        # ones hide an error, and one norm over all layers would let large layers hide a wrong small one.
        for kind in ("running_mean", "running_var"):
            out[prefix + kind] = max(_relative([state[n]], [ref_state[r]], [initial[n]])
                                     for n, r in names.items() if n.endswith(kind))
        # num_batches_tracked counts the forwards (online: 1 + L per step, momentum: 1), exactly
        same = all(int(state[n]) == int(ref_state[r]) for n, r in names.items() if n.endswith("num_batches_tracked"))
        out[prefix + "num_batches_tracked"] = 0.0 if same else float("inf")
    # the queue: the keys written by the steps (unit vectors) relative to their norm; the rest exactly
    written = ref.written
    out["queue.features"] = float((state["queue.features"][written].double() - ref.queue[written].double()).norm()
                                  / ref.queue[written].double().norm())
    exact = (torch.equal(state["queue.features"][~written], ref.queue[~written])
             and torch.equal(state["queue.labels"], ref.queue_labels) and int(state["queue.ptr"]) == ref.ptr)
    out["queue.labels+ptr+unwritten"] = 0.0 if exact else float("inf")
    for key in ("loss", "loss_con", "loss_pbsd"):  # worst step
        out["losses." + key] = max(abs(got[key] - want[rank][key]) / abs(want[rank][key])
                                   for got, want in zip(losses, ref.losses, strict=True))
    return out


def report(title: str, diffs: dict[str, float]) -> None:
    print(f"\n[parity] {title}")
    for key, value in diffs.items():
        print(f"[parity]   {key:32s} {value:.3e}")


# ------------------------------------------------------------------------------------------------
# Single process
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One compute thread: with 2 threads on a 2-core machine that is also running something else,
    OpenMP's waiting makes these small convolutions ~20x slower (measured: 0.5 s vs 9 s per step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single() -> dict:
    """The reference trajectory and the official dscl model's, from the same start and data."""
    model = official_model()
    initial = copy.deepcopy(model.state_dict())
    batches = make_batches()
    ref = Reference(initial, world=1)
    for data in batches:
        ref.step(data, LR, EMA_M)
    losses = run_dscl(model, batches)
    return {"initial": initial, "batches": batches, "ref": ref, "state": model.state_dict(), "losses": losses}


def _control(single: dict, patch_bn: str, roi_aligned: bool) -> dict[str, float]:
    model = DSCLModel(Encoder(build_backbone("resnet18"), dim=DIM), queue_size=QUEUE, patch_bn=patch_bn,
                      roi_aligned=roi_aligned)
    model.load_state_dict(single["initial"])
    losses = run_dscl(model, single["batches"])
    return compare(model.state_dict(), losses, single["ref"], 0, single["initial"])


def test_official_step_matches_the_reference(single):
    """dscl's pretrain_step (profile official) == the paper's step, for STEPS steps, within TOL."""
    diffs = compare(single["state"], single["losses"], single["ref"], 0, single["initial"])
    report(f"1 process, {STEPS} steps, resnet18, batch {BATCH}, L={SLOTS}, K={QUEUE}, lr {LR}", diffs)
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"dscl differs from the reference beyond {TOL}: {bad}"


@pytest.mark.parametrize(("patch_bn", "roi_aligned"), [("joint", False), ("per-slot", True), ("joint", True)])
def test_other_conventions_are_detected(single, patch_bn, roi_aligned):
    """Negative controls: the comparison must see a one-convention change, by a wide margin.

    ``joint`` normalises all L*B crops together (and updates the running statistics once), so
    parameters and BatchNorm buffers move differently; ``roi_aligned=True`` pools other teacher regions,
    so PBSD and the update change.
    """
    diffs = _control(single, patch_bn, roi_aligned)
    report(f"negative control patch_bn={patch_bn} roi_aligned={roi_aligned}", diffs)
    assert diffs["online.params"] > CONTROL_FACTOR * TOL, diffs
    if roi_aligned:
        assert diffs["losses.loss_pbsd"] > CONTROL_FACTOR * TOL, diffs
    if patch_bn == "joint":
        assert diffs["online.running_mean"] > CONTROL_FACTOR * TOL, diffs
        assert diffs["online.running_var"] > CONTROL_FACTOR * TOL, diffs
        assert diffs["online.num_batches_tracked"] == float("inf"), diffs


# ------------------------------------------------------------------------------------------------
# Two processes
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_match_the_reference(tmp_path):
    """2 gloo processes under torchrun == the reference playing both ranks, within TOL.

    Covered beyond the single process: MoCo's shuffle-BN for the keys (the worker replaces
    ``torch.randperm`` by the test's permutation, and the reference's key encoder of rank r runs on the
    permuted half r; each rank's momentum-encoder BatchNorm statistics can only match the reference's
    copy if the same images were grouped), the average of the ranks' gradients (parameters), each rank's
    own BatchNorm buffers of both encoders (local queries and patches), the per-rank losses over the
    local batch and the global queue, and the enqueue of the gathered keys in rank order.
    """
    batches = make_batches(seed=4321)
    g = torch.Generator().manual_seed(99)
    perms = [torch.randperm(BATCH, generator=g) for _ in range(STEPS)]
    spec, out = tmp_path / "spec.pt", tmp_path / "out.pt"
    torch.save({"overrides": OVERRIDES, "classes": CLASSES, "batches": batches, "perms": perms, "lr": LR,
                "m": EMA_M, "loss_cfg": dataclasses.asdict(LOSS_CFG), "sgd": (SGD_MOMENTUM, WEIGHT_DECAY)}, spec)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "parity_worker.py"), str(spec), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, f"worker failed (rc {res.returncode}):\n{res.stderr[-4000:]}"
    result = torch.load(out, weights_only=False)
    initial, ranks = result["initial"], result["ranks"]

    ref = Reference(initial, world=2)
    for data, perm in zip(batches, perms, strict=True):
        ref.step(data, LR, EMA_M, perm)

    states = [r["state"] for r in ranks]
    for key in states[0]:  # parameters and the queue are the same tensors on every rank
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(states[0][key], states[1][key]), key
    # ...but each rank keeps its own BatchNorm statistics (its own images; its own shuffled key group)
    for key in ("online.backbone.bn1.running_mean", "momentum.backbone.bn1.running_mean"):
        assert not torch.allclose(states[0][key], states[1][key]), key
    assert all(r["randperm_calls"] == STEPS for r in ranks), [r["randperm_calls"] for r in ranks]
    bad = {}
    for rank, got in enumerate(ranks):
        diffs = compare(got["state"], got["losses"], ref, rank, initial)
        report(f"2 processes, rank {rank}, {STEPS} steps (global batch {BATCH}, shuffle-BN)", diffs)
        bad.update({f"rank{rank}.{k}": v for k, v in diffs.items() if not v <= TOL})
    assert not bad, f"dscl differs from the reference beyond {TOL}: {bad}"
