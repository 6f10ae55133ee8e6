"""keep_freed_memory, in a child process each (its settings are process-wide): an upload encoded
on a background thread (PipelinedUpload, the worker's default) reuses its memory next round
instead of page-faulting it in again."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from dept_comm.codecs import get_codec
    from dept_comm.memory import keep_freed_memory
    from dept_comm.pipeline import PipelinedUpload
    from dept_comm.streaming import StreamOpenInfo, encode_stream

    pad = None if sys.argv[1] == "none" else int(sys.argv[1])
    ok = keep_freed_memory(max_arenas=0, top_pad_bytes=pad)  # as dept-worker's CLI does
    body = {f"t{i}": torch.randn(4 << 20) for i in range(8)}  # 128 MiB of fp32

    def faults_of_one_upload(i):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        upload = PipelinedUpload(
            encode_stream(body, open_info=StreamOpenInfo(upload_id=f"u{i}"), codec=get_codec("fp32"))
        )
        frames = upload.wait()
        assert sum(len(f.data) for f in frames[1:]) == 128 << 20
        del upload, frames
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    print(json.dumps({"ok": ok, "faults": [faults_of_one_upload(i) for i in range(3)]}))
    """
)


def _faults(top_pad: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, top_pad], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_an_upload_encoded_on_a_thread_reuses_its_memory_next_round() -> None:
    got = _faults(str(64 << 20))
    if not got["ok"]:
        pytest.skip("no glibc mallopt here")
    faults = got["faults"]
    assert isinstance(faults, list)
    # The first round maps its frames in (32,768 faults of 4 KiB pages here; fewer with huge
    # pages); the later ones reuse them (1 each here, 16,645 each without the pad).
    assert faults[0] > 0
    assert max(faults[1:]) * 16 <= faults[0], faults
