"""StagingArea keeps released in-memory buffers for the next uploads, within its budget, and never
one that something else still holds (a same-bytes tensor decoded from staging is the buffer)."""

from __future__ import annotations

import torch

from dept_comm.codecs import get_codec
from dept_comm.staging import MemoryBacking, StagingArea
from dept_comm.streaming import StreamOpenInfo, StreamReceiver, encode_stream

KIB = 1 << 10


def _backing(upload, size: int) -> MemoryBacking:
    backing = upload.allocate(size)
    assert isinstance(backing, MemoryBacking)
    return backing


def test_a_released_buffer_is_reused_for_a_tensor_of_its_size(tmp_path):
    area = StagingArea(tmp_path, memory_budget_bytes=64 * KIB)
    first = _backing(area.upload(), 16 * KIB)
    first.write(0, b"\x01" * KIB)
    assert first.tensor is not None
    address = first.tensor.data_ptr()  # holding the tensor itself would keep it out of the pool
    first.release()
    assert area.kept_bytes == 16 * KIB and area.memory_bytes == 0
    again = _backing(area.upload(), 16 * KIB)
    assert again.tensor is not None and again.tensor.data_ptr() == address
    assert area.kept_bytes == 0 and area.memory_bytes == 16 * KIB
    other = _backing(area.upload(), 8 * KIB)
    assert other.tensor is not None and other.tensor.data_ptr() != address


def test_a_buffer_still_held_elsewhere_is_not_kept(tmp_path):
    area = StagingArea(tmp_path, memory_budget_bytes=64 * KIB)
    backing = _backing(area.upload(), 16 * KIB)
    assert backing.tensor is not None
    view = backing.tensor.view(torch.float32)  # a decoded same-bytes tensor is such a view
    backing.release()
    assert area.kept_bytes == 0
    backing = _backing(area.upload(), 16 * KIB)
    chunk = backing.read(0, KIB)  # a memoryview of the staged bytes
    backing.release()
    assert area.kept_bytes == 0
    del view, chunk


def test_kept_and_staged_bytes_stay_within_the_budget(tmp_path):
    area = StagingArea(tmp_path, memory_budget_bytes=32 * KIB)
    upload = area.upload()
    a, b = _backing(upload, 16 * KIB), _backing(upload, 16 * KIB)
    a.release()
    b.release()
    assert area.kept_bytes == 32 * KIB
    c = _backing(area.upload(), 24 * KIB)  # another size: kept buffers make room
    assert area.memory_bytes == 24 * KIB and area.memory_bytes + area.kept_bytes <= 32 * KIB
    c.release()
    assert area.memory_bytes + area.kept_bytes <= 32 * KIB


def test_trim_drops_buffers_kept_longer_than_idle_s(tmp_path):
    area = StagingArea(tmp_path, memory_budget_bytes=64 * KIB)
    _backing(area.upload(), 16 * KIB).release()
    assert area.trim(idle_s=3600.0) == 0 and area.kept_bytes == 16 * KIB
    assert area.trim() == 16 * KIB and area.kept_bytes == 0


def test_a_decoded_fp32_tensor_keeps_its_values_when_later_uploads_reuse_staging(tmp_path):
    area = StagingArea(tmp_path, memory_budget_bytes=1 << 20)
    fp32 = get_codec("fp32")

    def receive(value: float) -> torch.Tensor:
        tensors = {"w": torch.full((4096,), value)}
        rx = StreamReceiver(staging=area.upload())
        for msg in encode_stream(tensors, open_info=StreamOpenInfo(upload_id=f"u{value}"), codec=fp32):
            rx.add(msg)
        out = rx.decode_all()["w"]
        rx.discard()
        return out

    first = receive(1.0)
    second = receive(2.0)  # the first's buffer is still the decoded tensor: not reused
    assert torch.equal(first, torch.full((4096,), 1.0)) and torch.equal(second, torch.full((4096,), 2.0))
    assert area.kept_bytes == 0
