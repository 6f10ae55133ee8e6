"""dept_comm.participant.Participant against a real server in this process: a plain nn.Module
(DEPT's model, its embeddings kept local) trained DiLoCo-style by two participants."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dept_comm.errors import ManifestMismatchError
from dept_comm.frames import chunk_of, header_of
from dept_comm.participant import Participant
from dept_model import Variant, build_model, model_preset
from tests.integration.servers import serving

VOCAB = 64


def tiny_model(seed: int) -> nn.Module:
    return build_model(model_preset("tiny"), Variant.SPEC, vocab_size=VOCAB, seed=seed)


def stream_names(items: Any) -> set[str]:
    names = set()
    for item in items:
        chunk = chunk_of(item)
        header = header_of(chunk) if chunk is not None else None
        if header is not None:
            names.add(header.name)
    return names


def recording(fn: Callable[..., Any], seen: set[str], *, upload: bool) -> Callable[..., Any]:
    def wrapped(arg: Any, **kwargs: Any) -> Any:
        if upload:
            seen.update(stream_names(arg))
            return fn(arg, **kwargs)
        out = fn(arg, **kwargs)
        seen.update(stream_names(out))
        return out

    return wrapped


@pytest.mark.timeout(240)
def test_two_participants_train_a_module_in_place_with_the_servers_digests(tmp_path: Path) -> None:
    with serving(tmp_path, workers=2, rounds=2) as server:
        target = f"127.0.0.1:{server.port}"
        results: dict[str, dict[str, Any]] = {}
        errors: list[BaseException] = []

        def participant(name: str, seed: int) -> None:
            try:
                model = tiny_model(seed)
                local_names = {n for n, _ in model.named_parameters() if n.startswith("embeddings.")}
                assert local_names
                params = {n: p for n, p in model.named_parameters()}
                opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
                gen = torch.Generator().manual_seed(seed)
                x = torch.randint(0, VOCAB, (2, 16), generator=gen)
                y = torch.randint(0, VOCAB, (2, 16), generator=gen)
                seen: set[str] = set()
                losses, digests = [], []
                with Participant(
                    model, target, name=name, sync_every=4, local=["embeddings.*"], timeout_s=30
                ) as p:
                    p.client.pull = recording(p.client.pull, seen, upload=False)  # type: ignore[method-assign]
                    p.client.push = recording(p.client.push, seen, upload=True)  # type: ignore[method-assign]
                    assert p.version >= 0 and p.worker_id
                    while not p.finished:
                        opt.zero_grad()
                        loss = model(x, y)
                        loss.backward()
                        opt.step()
                        losses.append(loss.item())
                        result = p.step(metrics={"loss": loss.item()})
                        if result is not None:
                            assert result.contributed
                            assert result.version == server.app.model.version
                            digests.append((p.digest(), server.app.model.digest))
                    state = p.state_dict()
                results[name] = {
                    "losses": losses,
                    "digests": digests,
                    "seen": seen,
                    "local": local_names,
                    "same_objects": all(p is params[n] for n, p in model.named_parameters()),
                    "state": state,
                }
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=participant, args=(f"p{i}", i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=200)
        assert not errors, errors
        records = server.app.records
    assert [r.round for r in records] == [0, 1]
    assert all(r.num_workers == 2 for r in records)
    for name, r in results.items():
        assert len(r["digests"]) == 2, name  # one sync per round, the run then finished
        for mine, servers in r["digests"]:
            assert mine == servers
        assert r["seen"] and all(n.startswith("body.") for n in r["seen"]), r["seen"]
        assert not (r["seen"] & r["local"])
        assert r["same_objects"]
        assert r["losses"][-1] < r["losses"][0]
        assert r["state"]["steps"] == 8 and r["state"]["version"] == 2
    assert results["p0"]["digests"] == results["p1"]["digests"]


@pytest.mark.timeout(120)
def test_a_module_whose_shared_tensors_are_not_the_servers_is_refused_at_join(tmp_path: Path) -> None:
    with serving(tmp_path, workers=1, rounds=1) as server:
        model = tiny_model(0)  # the embeddings shared too: the server has no such tensor
        p = Participant(model, f"127.0.0.1:{server.port}", name="bad", timeout_s=30)
        with pytest.raises(ManifestMismatchError, match="embeddings"), p:
            pass


@pytest.mark.timeout(240)
def test_a_participant_with_a_state_dir_continues_where_it_stopped(tmp_path: Path) -> None:
    with serving(tmp_path, workers=1, rounds=2) as server:
        target = f"127.0.0.1:{server.port}"

        def solo(module: nn.Module) -> Participant:  # the same name and state dir: one participant
            return Participant(
                module,
                target,
                name="solo",
                sync_every=2,
                local="embeddings.*",
                state_dir=tmp_path / "s",
                timeout_s=30,
            )

        model = tiny_model(0)
        with solo(model) as p:
            p.step()
            first = p.step()
            assert first is not None and first.round_idx == 0 and p.round == 1
        emb = model.get_submodule("embeddings").weight.detach().clone()
        again = tiny_model(1)
        with solo(again) as p:
            assert p.steps == 2  # restored
            assert torch.equal(again.get_submodule("embeddings").weight, emb)  # local state restored
            while not p.finished:
                p.step()
        assert p.steps == 4
