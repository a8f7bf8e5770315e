"""Random streams: saved and restored exactly, one GPU's state per rank, derived seeds."""

import random

import numpy as np
import torch

from dscl.rng import rng_state, set_rng_state


def test_rng_state_roundtrip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class FakeCuda:
    """Stands in for torch.cuda on a machine with ``n`` GPUs whose current device is ``current``.

    ``set_rng_state_all`` fails like the real one when given more states than there are GPUs.
    """

    def __init__(self, monkeypatch, n: int, current: int = 0):
        self.states = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(n)}
        self.current = current
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(i) for i in range(n)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: [self.set(s, i) for i, s in enumerate(states)])

    def _index(self, device):
        if device in (None, "cuda"):
            return self.current
        return device if isinstance(device, int) else torch.device(device).index

    def get(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set(self, state, device="cuda"):
        i = self._index(device)
        if i not in self.states:
            raise IndexError("list index out of range")  # what torch.cuda.default_generators[i] raises
        self.states[i] = state.clone()


def test_rng_state_saves_only_this_process_gpu(monkeypatch):
    """Issue #11 item 3: a rank of an 8-GPU node saves its own GPU's RNG, not all eight."""
    FakeCuda(monkeypatch, n=8, current=5)
    state = rng_state()
    assert torch.is_tensor(state["cuda"]) and torch.equal(state["cuda"], torch.full((4,), 5, dtype=torch.uint8))


def test_rng_state_from_8_gpus_restores_on_1(monkeypatch):
    """Resuming on fewer GPUs (or a narrower CUDA_VISIBLE_DEVICES) raised IndexError."""
    saver = FakeCuda(monkeypatch, n=8, current=3)
    state = rng_state()
    state_v1 = {**state, "cuda": [torch.full((4,), 10 + i, dtype=torch.uint8) for i in range(8)]}  # old format
    fake = FakeCuda(monkeypatch, n=1)
    set_rng_state(state)
    assert torch.equal(fake.states[0], saver.states[3])  # this rank's own stream continues on its new GPU
    set_rng_state(state_v1)  # old checkpoints: the current device's entry
    assert torch.equal(fake.states[0], torch.full((4,), 10, dtype=torch.uint8))


def test_derived_seeds_differ_per_rank_and_epoch():
    from dscl.rng import derived_seed

    seeds = {derived_seed(0, r, e) for r in range(8) for e in range(3)}
    assert len(seeds) == 24 and derived_seed(0, 1, 2) == derived_seed(0, 1, 2)
    assert derived_seed(-1, 0, 0) >= 0


def _draws() -> tuple:
    """One draw from each stream, the cached-gaussian paths included (numpy's has_gauss, python's gauss_next)."""
    return random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(3)


def _same_draws(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4] and torch.equal(a[4], b[4])


def test_rng_state_is_plain_data_that_a_weights_only_load_restores_exactly(tmp_path):
    """Issue 28 item 16: checkpoints are read with torch.load(weights_only=True), so the saved states must be
    tensors and plain containers (numpy's state was a tuple holding an ndarray, which that load refuses)."""
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached gaussian in both generators
    torch.save({"rng": [rng_state()]}, tmp_path / "rng.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []
    state = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0]
    a = _draws()
    set_rng_state(state)
    _same_draws(a, _draws())


def test_numpy_states_of_older_checkpoints_still_restore():
    """Checkpoints written before the plain states hold numpy's legacy tuple ('MT19937', uint32 array, ...)."""
    np.random.standard_normal()
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    a = _draws()
    set_rng_state(old)
    _same_draws(a, _draws())
