"""dept-worker options that never ran end to end: ``--compile`` on CPU and ``--data hf:`` on a local dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dept_model.data import load_texts
from tests.e2e.harness import (
    ENV,
    EXIT_S,
    MARGIN_S,
    RUN_S,
    START_S,
    Server,
    describe,
    records,
    start_worker,
    wait_workers,
    worker_digests,
)
from tests.e2e.test_rounds import server_args, worker_args

pytestmark = pytest.mark.slow

COMPILE_RUN_S = 2 * RUN_S  # inductor compiles the forward and backward graphs first (C++ on CPU)


def one_worker_run(
    vocab: Path,
    tmp: Path,
    worker_extra: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    run_s: float = RUN_S,
) -> list[dict]:
    """One server and one worker (source sw) for two rounds; the round records, replicas verified."""
    args = server_args("spec", vocab, tmp, rounds=2)
    args[args.index("--workers") + 1] = "1"
    server = Server(args, tmp / "server.log")
    wargs = worker_args(server.port, "sw", vocab, tmp, extra=worker_extra)
    wargs[wargs.index("--inner-steps") + 1] = "2"
    worker = start_worker(wargs, tmp / "sw.log", env=env, cwd=cwd)
    wait_workers({"sw": worker}, run_s)
    assert server.wait(EXIT_S) == 0, describe()
    rounds = [r for r in records(tmp / "metrics.jsonl") if r.get("kind") != "final"]
    assert [(r["round"], r["num_workers"]) for r in rounds] == [(0, 1), (1, 1)], describe()
    digests = worker_digests(tmp / "w-sw")
    for r in rounds:  # the worker's replica verified the server's digest after every round
        assert digests[r["round"] + 1] == r["body_digest"], f"replica diverged at round {r['round']}"
    return rounds


@pytest.mark.timeout(START_S + COMPILE_RUN_S + EXIT_S + MARGIN_S)
def test_compile_on_cpu_runs_and_replicas_verify(global_vocab: Path, tmp_path: Path) -> None:
    cache = tmp_path / "inductor"
    env = dict(ENV, TORCHINDUCTOR_CACHE_DIR=str(cache))
    rounds = one_worker_run(global_vocab, tmp_path, ["--compile"], env=env, run_s=COMPILE_RUN_S)
    assert all(w["train_loss"] is not None for r in rounds for w in r["workers"])
    # The flag took effect: inductor compiled the step into this worker's cache directory.
    compiled = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert compiled, f"--compile left nothing in TORCHINDUCTOR_CACHE_DIR={cache}\n{describe()}"


def write_local_dataset(root: Path, source: str) -> dict[str, int]:
    """A dataset folder ``datasets.load_dataset(path)`` reads: train/validation JSON lines with a
    ``text`` column, here the embedded corpus's documents of ``source``. Returns docs per split."""
    root.mkdir(parents=True)
    counts = {}
    for split in ("train", "validation"):
        docs = load_texts(source, split)
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        counts[split] = len(docs)
    return counts


@pytest.mark.timeout(START_S + RUN_S + EXIT_S + MARGIN_S)
def test_hf_data_from_a_local_dataset_folder(global_vocab: Path, tmp_path: Path) -> None:
    # hf:NAME goes through datasets.load_dataset(NAME), which takes a folder relative to the
    # working directory; a local folder needs no network, so Hugging Face offline mode (set by the
    # harness) stays on, with the caches in the test's directory.
    counts = write_local_dataset(tmp_path / "sw-local", "sw")
    env = dict(ENV, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    assert env["HF_DATASETS_OFFLINE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    one_worker_run(global_vocab, tmp_path, ["--data", "hf:sw-local"], env=env, cwd=tmp_path)
    log = (tmp_path / "sw.log").read_text()
    for split, n in counts.items():
        assert f"hub_read dataset=sw-local config=None split={split} docs={n} " in log, log[-3000:]
