"""``dept-bench codecs --quick``: one row per registered codec and input, sane numbers."""

from __future__ import annotations

import time

from dept_bench.codecs import run
from dept_comm.codecs import codec_names


def test_quick_codec_benchmark_shape() -> None:
    start = time.perf_counter()
    result = run(quick=True)
    assert time.perf_counter() - start < 30
    assert result["threads"] == 1
    rows = {(r["codec"], r["input"]): r for r in result["codecs"]}
    assert set(rows) == {(c, i) for c in codec_names() for i in ("random", "pseudo_gradient")}
    for row in rows.values():
        assert row["ratio_vs_fp32"] > 0 and row["encode_MBps"] > 0 and row["decode_MBps"] > 0
        # topk drops ~98% of the elements in one shot (error feedback sends them later): its
        # single-shot error is only bounded by keeping the largest ones (< 1).
        assert 0 <= row["rel_l2_error"] < (1.0 if row["codec"] == "topk" else 0.5)
    for inp in ("random", "pseudo_gradient"):
        assert rows[("fp32", inp)]["ratio_vs_fp32"] == 1.0 and rows[("fp32", inp)]["rel_l2_error"] == 0.0
        assert rows[("int8", inp)]["ratio_vs_fp32"] >= 3.9
        assert rows[("int4", inp)]["ratio_vs_fp32"] >= 7.5
        assert rows[("bf16-zstd", inp)]["ratio_vs_fp32"] > rows[("bf16", inp)]["ratio_vs_fp32"]
        assert rows[("topk", inp)]["ratio_vs_fp32"] >= 100
    pg = result["config"]["pseudo_gradient"]
    assert pg["params"] > 10_000 and pg["loss_last"] < pg["loss_first"]
