"""dept-experiment --preset smoke end to end: real dept-server and dept-worker processes on loopback,
STD in the experiment's process; the report's numbers against the files they come from, and the
same seed giving the same numbers twice."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dept_comm.checkpoint import CheckpointStore
from dept_comm.names import BODY_PREFIX, EMB_WEIGHT
from dept_experiment.config import preset
from dept_experiment.report import fmt
from dept_model import Variant, build_model, evaluate, load_state, model_preset
from dept_model.data import eval_batches, load_texts, tokenize_texts
from dept_model.tokenizer import load_tokenizer, token_byte_lengths
from tests.e2e.harness import records

RUN_TIMEOUT_S = 600  # one smoke run: about 1 min on an idle 2-core machine, a few under load
SMOKE = preset("smoke")
DEPT = ("glob", "trim", "spec", "spec-opt")
AGAIN = ("std", "trim", "spec-opt")  # the second run: row-wise and per-vocabulary aggregation


def _run(out: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dept_experiment.cli", "--preset", "smoke", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"dept-experiment failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("smoke")
    return out, _run(out)


def _results(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "report" / "results.json").read_text())
    return data


def _score(model: Any, tok: Any, spec: str, split: str) -> float:
    tokens = tokenize_texts(tok, load_texts(spec, split))
    batches = eval_batches(
        tokens, seq_len=SMOKE.seq_len, batch_size=SMOKE.batch_size, max_batches=SMOKE.final_eval_batches
    )
    return float(evaluate(model, batches, token_byte_lengths(tok))["bits_per_byte"])


def _shared(out: Path, variant: str) -> dict[str, torch.Tensor]:
    with CheckpointStore(out / variant / "checkpoints") as store:
        ckpt = store.latest()
    assert ckpt is not None and ckpt.meta["round_idx"] == SMOKE.rounds
    return ckpt.tensors["shared"]


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_smoke_report_matches_the_metrics_and_models_it_comes_from(smoke) -> None:
    out, stdout = smoke
    results = _results(out)
    variants = results["variants"]
    assert list(variants) == sorted(SMOKE.variants)  # results.json is written with sorted keys
    # Progress: a line per phase and per round, with elapsed seconds.
    for v in DEPT:
        for r in range(1, SMOKE.rounds + 1):
            assert re.search(rf"\[{re.escape(v)}\] round {r}/{SMOKE.rounds}: .* \(\d+ s\)", stdout), (v, r)
    assert re.search(r"std step \d+/16: ", stdout)

    for v in DEPT:
        lines = records(out / v / "metrics.jsonl")
        rounds = [r for r in lines if r.get("kind") != "final"]
        (final,) = [r for r in lines if r.get("kind") == "final"]
        assert len(rounds) == SMOKE.rounds
        b = variants[v]["bytes"]
        # Bytes: each round's up and down payload, and totals with the final pull.
        assert [(r["up"], r["down"]) for r in b["per_round"]] == [
            (r["up_payload_bytes"], r["down_payload_bytes"]) for r in rounds
        ]
        assert b["total_up"] == sum(r["up_payload_bytes"] for r in rounds) + final["up_payload_bytes"]
        assert b["total_down"] == sum(r["down_payload_bytes"] for r in rounds) + final["down_payload_bytes"]
        assert b["total"] == b["total_up"] + b["total_down"] > 0
        # Curve: round r's evaluation is the workers' before round r; the last point the final line's.
        curve = variants[v]["curve"]
        for point, line in zip(curve, [*rounds, final], strict=True):
            assert point["per_source"] == {s: line["eval"][s]["bits_per_byte"] for s in SMOKE.sources}
        # The rebuilt final replicas score exactly what the workers reported at Leave.
        for s, check in variants[v]["checks"].items():
            assert check["rebuilt"] == check["worker"] == final["eval"][s]["bits_per_byte"], (v, s)

    # Final numbers, recomputed here from the files with the real readers.
    tok = load_tokenizer(out / "tokenizers" / "global" / "global.json")
    glob = build_model(model_preset("tiny"), Variant.GLOB, vocab_size=tok.get_vocab_size(), seed=0)
    shared = _shared(out, "glob")
    glob.load_body_state(
        {k.removeprefix(BODY_PREFIX): t for k, t in shared.items() if k.startswith(BODY_PREFIX)}
    )
    with torch.no_grad():
        glob.embeddings.weight.copy_(shared[EMB_WEIGHT])
    assert (
        _score(glob, tok, "en", "test") == variants["glob"]["in_distribution"]["en"]["test"]["bits_per_byte"]
    )
    assert _score(glob, tok, "la", "test") == variants["glob"]["heldout"]["la"]["bits_per_byte"]

    std = build_model(model_preset("tiny"), Variant.STD, vocab_size=tok.get_vocab_size(), seed=0)
    std.load_state_dict(load_state(out / "std" / "std-model.safetensors")["model"])
    assert (
        _score(std, tok, "sw", "validation")
        == variants["std"]["in_distribution"]["sw"]["validation"]["bits_per_byte"]
    )

    own = load_tokenizer(out / "tokenizers" / "per-source" / "sw.json")
    spec_opt = build_model(model_preset("tiny"), Variant.SPEC_OPT, vocab_size=own.get_vocab_size(), seed=0)
    (state_file,) = (out / "spec-opt" / "workers" / "sw").glob("trainer-*.safetensors")
    spec_opt.load_state_dict(load_state(state_file)["model"])
    shared = _shared(out, "spec-opt")
    spec_opt.load_body_state({k.removeprefix(BODY_PREFIX): t for k, t in shared.items()})
    got = variants["spec-opt"]["udhr"]["udhr_sw"]
    assert got["via"] == "sw" and _score(spec_opt, own, "udhr_sw", "test") == got["bits_per_byte"]
    # SPEC-OPT's embeddings are sized to the source's own, smaller, vocabulary.
    assert variants["spec-opt"]["embedding_params"]["sw"] == own.get_vocab_size() * 64
    assert variants["glob"]["embedding_params"]["sw"] == tok.get_vocab_size() * 64

    # The markdown shows those numbers: the averages table, row by row.
    md = (out / "report" / "report.md").read_text()
    for v, res in variants.items():
        ind = res["in_distribution"]
        val = sum(ind[s]["validation"]["bits_per_byte"] for s in SMOKE.sources) / len(SMOKE.sources)
        test = sum(ind[s]["test"]["bits_per_byte"] for s in SMOKE.sources) / len(SMOKE.sources)
        assert f"| {v} | {fmt(val)} | {fmt(test)} |" in md, v
    for v in DEPT:
        assert f"{variants[v]['bytes']['total']:,}" in md, v
    for plot in ("bits_per_byte.png", "bits_per_byte_per_source.png", "bytes.png"):
        assert (out / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in md


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 120)
def test_the_same_seed_gives_the_same_numbers(smoke, tmp_path) -> None:
    first_out, _ = smoke
    _run(tmp_path, "--variants", ",".join(AGAIN))
    first, again = _results(first_out)["variants"], _results(tmp_path)["variants"]
    assert list(again) == sorted(AGAIN)
    for v in AGAIN:
        for key in ("in_distribution", "heldout", "udhr", "curve"):
            assert again[v][key] == first[v][key], (v, key)
    for v in ("trim", "spec-opt"):  # and the server's model after every round, bit for bit
        digests = [[r.get("digest") for r in records(o / v / "metrics.jsonl")] for o in (first_out, tmp_path)]
        assert digests[0] == digests[1] and all(digests[0][: SMOKE.rounds])
    # --reuse evaluates the finished runs again without training: the same numbers.
    stdout = _run(tmp_path, "--variants", ",".join(AGAIN), "--reuse")
    assert all(f"{v}: reusing the finished run" in stdout for v in AGAIN)
    assert "dept-server +" not in stdout and "std step" not in stdout
    reused = _results(tmp_path)["variants"]
    for v in AGAIN:
        for key in ("in_distribution", "heldout", "udhr", "curve"):
            assert reused[v][key] == again[v][key], (v, key)
