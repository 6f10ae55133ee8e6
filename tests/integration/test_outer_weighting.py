"""dept-server --outer-weighting: FedAvg over real uploads, uniform or weighted by each commit's num_tokens."""

from __future__ import annotations

import pytest
import torch

from dept_comm.codecs import get_codec
from dept_comm.participant.client import ServerClient
from dept_comm.pb import service_pb2
from dept_comm.streaming import PULL_LIMITS, receive_stream
from tests.integration.servers import Upload, join_and_pull, serving, worker_upload

TOKENS = {"sw": 1_024, "en": 3_072}  # what each worker says it trained on


def _down(update: torch.Tensor) -> torch.Tensor:
    """The server's int8 down-link of the first round's update (no residual yet)."""
    int8 = get_codec("int8")
    return int8.decode(int8.encode(update), tuple(update.shape), torch.float32)


def _round_with_two_workers(
    tmp_path, weighting: str
) -> tuple[dict[str, torch.Tensor], dict[str, Upload], dict, list[str]]:
    """Two workers upload random deltas with different num_tokens; return the body before, the
    uploads (with what the server decodes) and the body the server sends after the round."""
    with serving(tmp_path, workers=2, outer_weighting=weighting) as server:
        clients = {s: ServerClient(f"127.0.0.1:{server.port}", timeout_s=20) for s in TOKENS}
        try:
            joined = {s: join_and_pull(c, s) for s, c in clients.items()}
            uploads = {s: worker_upload(joined[s], seed=i + 1) for i, s in enumerate(TOKENS)}
            for s, client in clients.items():
                client.push(uploads[s].messages[:-1])
                request = uploads[s].commit_request(joined[s].worker_id, round_idx=0)
                request.num_tokens = TOKENS[s]
                assert client.commit(request).accepted
            info, after = receive_stream(
                clients["sw"].pull(service_pb2.PullRequest(worker_id=joined["sw"].worker_id, full=True)),
                limits=PULL_LIMITS,
            )
            assert info.target_version == 1  # both commits closed the round
        finally:
            for c in clients.values():
                c.close()
    order = sorted(TOKENS, key=lambda s: joined[s].worker_id)
    return joined["sw"].body, uploads, after, order


def _mean(uploads: dict[str, Upload], name: str, weights: dict[str, float], order: list[str]) -> torch.Tensor:
    """The server's mean: float32 sums folded in worker-id order (``order``), over the weights."""
    acc = uploads[order[0]].decoded[name] * weights[order[0]]
    for s in order[1:]:
        acc.add_(uploads[s].decoded[name], alpha=weights[s])
    return acc / sum(weights[s] for s in order)


@pytest.mark.parametrize("weighting", ["uniform", "tokens"])
def test_the_round_moves_the_body_by_the_weighted_mean_of_the_decoded_uploads(tmp_path, weighting) -> None:
    before, uploads, after, order = _round_with_two_workers(tmp_path, weighting)
    weights = {s: float(TOKENS[s]) if weighting == "tokens" else 1.0 for s in TOKENS}
    other = {s: 1.0 for s in TOKENS} if weighting == "tokens" else {s: float(TOKENS[s]) for s in TOKENS}
    names = [n for n in before if n.startswith("body.")]
    assert names
    for name in names:
        assert torch.equal(after[name], before[name] + _down(_mean(uploads, name, weights, order))), name
    # The other weighting gives another body: the weights reached the average.
    assert any(not torch.equal(after[n], before[n] + _down(_mean(uploads, n, other, order))) for n in names)
