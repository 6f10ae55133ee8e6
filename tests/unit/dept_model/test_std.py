"""STD baseline: temperature-sampled mixture over real sources, the training run, and dept-std."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dept_model import MixtureBatches, load_state
from dept_model.data import TokenBatches, load_texts, tokenize_texts
from dept_model.std import StdConfig, main, mixture_weights, run_std, source_seed
from dept_model.tokenizer import build_tokenizers, load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return load_tokenizer(
        build_tokenizers(["sw", "en", "zh"], vocab_size=300, out_dir=out, per_source=False)["global"]
    )


@pytest.fixture(scope="module")
def streams(tok):
    return {s: tokenize_texts(tok, load_texts(s, "train")) for s in ("sw", "en", "zh")}


def test_mixture_weights_follow_the_temperature(streams) -> None:
    counts = {s: len(t) for s, t in streams.items()}
    assert len(set(counts.values())) == 3  # the sources differ in size, or the test says nothing
    proportional = mixture_weights(counts, 1.0)
    total = sum(counts.values())
    assert proportional == pytest.approx({s: n / total for s, n in counts.items()})
    flat = mixture_weights(counts, 1e9)
    assert flat == pytest.approx(dict.fromkeys(counts, 1 / 3))
    mid = mixture_weights(counts, 3.33)
    smallest = min(counts, key=lambda s: counts[s])
    largest = max(counts, key=lambda s: counts[s])
    # Temperature moves probability from the largest source to the smallest, never past uniform.
    assert proportional[smallest] < mid[smallest] < 1 / 3 < mid[largest] < proportional[largest]
    assert sum(mid.values()) == pytest.approx(1.0)


def test_mixture_draws_each_source_at_its_weight_and_serves_its_batches(streams) -> None:
    names = list(streams)
    weights = mixture_weights({s: len(t) for s, t in streams.items()}, 3.33)

    def make(seed_offset: int) -> list[TokenBatches]:
        return [
            TokenBatches(streams[s], seq_len=8, batch_size=1, seed=source_seed(seed_offset, s)) for s in names
        ]

    mixture = MixtureBatches(make(0), [weights[s] for s in names], seed=5)
    replay = make(0)  # the same streams, advanced by hand: each batch must be the drawn source's next
    n = 4000
    drawn = dict.fromkeys(names, 0)
    for _ in range(n):
        x, y = mixture.next_batch()
        source = names[mixture.last_source]
        drawn[source] += 1
        rx, ry = replay[mixture.last_source].next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry)
    for s in names:
        p = weights[s]
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(drawn[s] / n - p) < 4 * sigma, (s, drawn[s] / n, p)


def test_run_std_is_deterministic_and_spends_exactly_its_steps(tok) -> None:
    config = StdConfig(
        sources=("sw", "en"), steps=6, batch_size=2, seq_len=16, eval_every=3, eval_batches=1, seed=3
    )
    a = run_std(config, tok)
    b = run_std(config, tok)
    assert [e["step"] for e in a.history] == [0, 3, 6]
    assert sum(a.batches_drawn.values()) == 6
    assert a.history[-1]["batches_drawn"] == a.batches_drawn
    assert json.dumps(a.history[-1]["eval"]) == json.dumps(b.history[-1]["eval"])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Training moved the model: the curve is not flat.
    first = a.history[0]["eval"]["en"]["bits_per_byte"]
    assert a.history[-1]["eval"]["en"]["bits_per_byte"] != first


def test_dept_std_cli_writes_a_model_that_scores_what_its_history_says(tmp_path) -> None:
    out = tmp_path / "std"
    args = ["--sources", "sw,en", "--vocab-size", "300", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--eval-batches", "1", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "std step 4/4" in result.output and "mixture weights" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["batches_drawn"].values()) == 4
    assert summary["tokens_trained"] == 4 * 2 * 16
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    # Rebuild from the file with the real reader and score en's validation as the run did.
    from dept_model import Variant, build_model, evaluate, model_preset
    from dept_model.data import eval_batches
    from dept_model.tokenizer import token_byte_lengths

    tok = load_tokenizer(out / "tokenizers" / "global.json")
    model = build_model(model_preset("tiny"), Variant.STD, vocab_size=tok.get_vocab_size(), seed=0)
    model.load_state_dict(load_state(out / "std-model.safetensors")["model"])
    tokens = tokenize_texts(tok, load_texts("en", "validation"))
    scores = evaluate(
        model, eval_batches(tokens, seq_len=16, batch_size=2, max_batches=1), token_byte_lengths(tok)
    )
    assert scores["bits_per_byte"] == history[-1]["eval"]["en"]["bits_per_byte"]


def test_std_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="duplicates"):
        StdConfig(sources=("sw", "sw"), steps=1)
    with pytest.raises(ValueError, match="tau"):
        StdConfig(sources=("sw",), steps=1, tau=0)
    with pytest.raises(ValueError, match="steps"):
        StdConfig(sources=("sw",), steps=0)
