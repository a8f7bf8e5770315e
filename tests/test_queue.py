"""LabeledQueue: FIFO order, wrap-around, fill level, label alignment, state round-trip, errors."""

from __future__ import annotations

import pytest
import torch

from dscl.queue import LabeledQueue


def rows(start: int, n: int, dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i has features (i, i, ...) and label i, so alignment is checkable."""
    ids = torch.arange(start, start + n)
    return ids[:, None].float().expand(n, dim).clone(), ids


def reference(size: int, chunks: list[int]) -> list[int]:
    """Row-by-row FIFO written straight from the definition: slot = write counter mod size."""
    slots = [-1] * size
    counter = 0
    for start, n in chunks:
        for i in range(start, start + n):
            slots[counter % size] = i
            counter += 1
    return slots


def test_empty_queue():
    q = LabeledQueue(5, 3)
    assert len(q) == 0 and not q.is_full
    f, y = q.snapshot()
    assert f.shape == (0, 3) and y.shape == (0,)
    assert q.features.dtype == torch.float32 and q.labels.dtype == torch.int64
    assert q.ptr.shape == () and q.filled.shape == ()


def test_fifo_order_and_fill_level():
    q = LabeledQueue(6, 2)
    q.enqueue(*rows(0, 2))
    assert len(q) == 2 and int(q.ptr) == 2 and int(q.filled) == 2
    f, y = q.snapshot()
    assert y.tolist() == [0, 1] and f[:, 0].tolist() == [0.0, 1.0]
    q.enqueue(*rows(2, 4))
    assert q.is_full and int(q.ptr) == 0
    q.enqueue(*rows(6, 1))  # overwrites the oldest entry (label 0)
    assert q.labels.tolist() == [6, 1, 2, 3, 4, 5]
    assert int(q.ptr) == 1 and len(q) == 6


def test_wrap_around_with_size_not_divisible_by_batch():
    q = LabeledQueue(10, 2)
    chunks = [(0, 3), (3, 3), (6, 3), (9, 3)]
    for i, (start, n) in enumerate(chunks):
        q.enqueue(*rows(start, n))
        assert len(q) == min(10, 3 * (i + 1))
    assert q.labels.tolist() == reference(10, chunks)  # [10, 11, 2, 3, ..., 9]
    assert q.labels.tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert int(q.ptr) == 2 and q.is_full
    torch.testing.assert_close(q.features[:, 1], q.labels.float())  # labels stay aligned


@pytest.mark.parametrize("ptr_before", [0, 3])
def test_more_rows_than_size_keeps_the_last_ones(ptr_before):
    q = LabeledQueue(4, 2)
    chunks = [(100, ptr_before)] if ptr_before else []
    if ptr_before:
        q.enqueue(*rows(100, ptr_before))
    q.enqueue(*rows(0, 11))
    chunks.append((0, 11))
    assert q.labels.tolist() == reference(4, chunks)
    assert sorted(q.labels.tolist()) == [7, 8, 9, 10]
    assert int(q.ptr) == (ptr_before + 11) % 4 and len(q) == 4
    torch.testing.assert_close(q.features[:, 0], q.labels.float())


def test_random_chunks_match_reference():
    g = torch.Generator().manual_seed(0)
    q = LabeledQueue(7, 3)
    chunks, start = [], 0
    for _ in range(20):
        n = int(torch.randint(0, 12, (1,), generator=g))
        q.enqueue(*rows(start, n, 3))
        chunks.append((start, n))
        start += n
        filled = min(7, start)
        assert len(q) == filled
        assert q.snapshot()[1].tolist() == reference(7, chunks)[:filled]


def test_stored_detached_float32_and_int64():
    q = LabeledQueue(4, 2)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    q.enqueue(x.to(torch.bfloat16) * 2, torch.tensor([1, 2, 3], dtype=torch.int32))
    f, y = q.snapshot()
    assert f.dtype == torch.float32 and not f.requires_grad and y.dtype == torch.int64
    assert y.tolist() == [1, 2, 3]


def test_size_zero_stays_empty():
    q = LabeledQueue(0, 4)
    q.enqueue(torch.randn(3, 4), torch.arange(3))
    f, y = q.snapshot()
    assert f.shape == (0, 4) and y.shape == (0,) and len(q) == 0 and q.is_full


def test_state_dict_round_trip():
    q = LabeledQueue(10, 3)
    q.enqueue(*rows(0, 7, 3))
    r = LabeledQueue(10, 3)
    r.load_state_dict(q.state_dict())
    assert len(r) == 7 and int(r.ptr) == 7
    torch.testing.assert_close(r.snapshot()[0], q.snapshot()[0])
    assert r.snapshot()[1].tolist() == list(range(7))
    r.enqueue(*rows(7, 5, 3))  # continues where the saved queue stopped
    assert r.labels.tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert set(q.state_dict()) == {"features", "labels", "ptr", "filled"}


def test_state_dict_nested_in_a_model():
    parent = torch.nn.Module()
    parent.queue = LabeledQueue(4, 2)
    parent.queue.enqueue(*rows(0, 3))
    other = torch.nn.Module()
    other.queue = LabeledQueue(4, 2)
    other.load_state_dict(parent.state_dict())
    assert len(other.queue) == 3


def test_load_validates_size_and_dim():
    q = LabeledQueue(10, 3)
    with pytest.raises(ValueError, match=r"features has shape \(10, 3\).*size=8, dim=3"):
        LabeledQueue(8, 3).load_state_dict(q.state_dict())
    with pytest.raises(ValueError, match=r"size=10, dim=4"):
        LabeledQueue(10, 4).load_state_dict(q.state_dict())
    bad = q.state_dict()
    bad["filled"] = torch.tensor(11)
    with pytest.raises(ValueError, match="filled"):
        LabeledQueue(10, 3).load_state_dict(bad)


def test_errors():
    q = LabeledQueue(4, 3)
    with pytest.raises(ValueError, match=r"features.*\(2, 5\)"):
        q.enqueue(torch.randn(2, 5), torch.arange(2))
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        q.enqueue(torch.randn(3), torch.arange(3))
    with pytest.raises(ValueError, match=r"labels.*\(2,\).*\(3,\)"):
        q.enqueue(torch.randn(2, 3), torch.arange(3))
    with pytest.raises(ValueError, match="integer"):
        q.enqueue(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="size"):
        LabeledQueue(-1, 3)
    with pytest.raises(ValueError, match="dim"):
        LabeledQueue(4, 0)
    assert len(q) == 0  # nothing written by the failed calls


def test_snapshot_is_a_view_of_the_buffers():
    q = LabeledQueue(4, 2)
    q.enqueue(*rows(0, 2))
    f, y = q.snapshot()
    assert f.data_ptr() == q.features.data_ptr() and y.data_ptr() == q.labels.data_ptr()


def test_fill_random_is_the_official_start():
    """model.queue_init=random (METHOD.md A.4): full, unit features, labels in [0, C), writes from row 0."""
    q = LabeledQueue(12, 4)
    q.fill_random(3, generator=torch.Generator().manual_seed(0))
    feats, labels = q.snapshot()
    assert len(q) == 12 and q.is_full and int(q.filled) == 12 and int(q.ptr) == 0
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(12))
    assert labels.min() >= 0 and labels.max() < 3 and len(set(labels.tolist())) > 1
    assert len({tuple(r) for r in feats.tolist()}) == 12  # random, not a constant
    again = LabeledQueue(12, 4)
    again.fill_random(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.features, q.features, rtol=0, atol=0)
    q.enqueue(*rows(100, 5, dim=4))  # the oldest (random) rows go first
    assert q.labels[:5].tolist() == list(range(100, 105)) and q._ptr == 5 and len(q) == 12
    torch.testing.assert_close(q.labels[5:], labels[5:].clone())
    restored = LabeledQueue(12, 4)
    restored.load_state_dict(q.state_dict())
    assert len(restored) == 12 and restored._ptr == 5
    with pytest.raises(ValueError, match="num_classes"):
        q.fill_random(0)
    LabeledQueue(0, 4).fill_random(3)  # a size-0 queue stays empty


def test_non_finite_keys_are_kept_out():
    """Issue #22 item 3: an inf/NaN key (an fp16 overflow of the momentum encoder) never enters the queue;
    its slot keeps the previous entry and `rejected` counts it on the device."""
    q = LabeledQueue(6, 2)
    q.enqueue(*rows(0, 6))
    feats, labels = rows(10, 4)
    feats[1, 0] = float("nan")
    feats[3, 1] = float("inf")
    q.enqueue(feats, labels)
    assert torch.isfinite(q.features).all()
    assert q.labels.tolist() == [10, 1, 12, 3, 4, 5] and q.features[:, 0].tolist() == [10, 1, 12, 3, 4, 5]
    assert int(q.rejected) == 2 and q._ptr == 4 and len(q) == 6
    wrap = LabeledQueue(3, 2)  # a batch that wraps around the end
    wrap.enqueue(*rows(0, 2))
    feats, labels = rows(5, 3)
    feats[2] = float("nan")
    wrap.enqueue(feats, labels)
    assert wrap.labels.tolist() == [6, 1, 5]  # slot 2 <- 5, slot 0 <- 6, slot 1 keeps 1 (7 was NaN)
    assert torch.isfinite(wrap.features).all() and int(wrap.rejected) == 1
    assert "rejected" not in q.state_dict()  # checkpoints keep their keys
