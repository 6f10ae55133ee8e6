"""TRIM/GLOB/SPEC embeddings: row export/import, TRIM's V_k-only softmax, deterministic rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from dept_model.config import model_preset
from dept_model.embeddings import GlobalEmbeddings, SpecEmbeddings, TrimEmbeddings, init_rows
from dept_model.variants import Variant, build_model

V = 300
IDS = torch.tensor([0, 3, 4, 17, 99, 150, 299])


def test_trim_export_import_round_trip():
    a = TrimEmbeddings(IDS, 16, vocab_size=V, seed=1)
    b = TrimEmbeddings(IDS, 16, vocab_size=V, seed=2)
    assert not torch.equal(a.weight, b.weight)
    ids, rows = a.export_rows()
    assert torch.equal(ids, IDS) and rows.shape == (len(IDS), 16)
    # shuffled order still lands each row on its global id
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    assert b.import_rows(ids[perm], rows[perm]) == len(IDS)
    assert torch.equal(b.weight, a.weight)
    # a subset touches only those rows
    b2 = TrimEmbeddings(IDS, 16, vocab_size=V, seed=2)
    before = b2.weight.detach().clone()
    b2.import_rows(torch.tensor([17]), torch.ones(1, 16))
    assert torch.equal(b2.weight[3], torch.ones(16))
    assert torch.equal(b2.weight[[0, 1, 2, 4, 5, 6]], before[[0, 1, 2, 4, 5, 6]])
    # export is a copy
    rows.zero_()
    assert not torch.equal(a.weight, torch.zeros_like(a.weight))


def test_trim_import_rejects_unknown_ids_unless_lenient():
    emb = TrimEmbeddings(IDS, 8, vocab_size=V)
    with pytest.raises(ValueError, match="not held"):
        emb.import_rows(torch.tensor([3, 5]), torch.zeros(2, 8))
    assert emb.import_rows(torch.tensor([3, 5]), torch.zeros(2, 8), strict=False) == 1
    assert torch.equal(emb.weight[1], torch.zeros(8))
    with pytest.raises(ValueError, match="duplicate"):
        emb.import_rows(torch.tensor([3, 3]), torch.zeros(2, 8))
    with pytest.raises(ValueError):
        emb.import_rows(torch.tensor([3]), torch.zeros(1, 7))


def test_trim_rows_equal_global_rows_of_same_seed():
    glob = GlobalEmbeddings(V, 8, seed=5)
    trim = TrimEmbeddings(IDS, 8, vocab_size=V, seed=5)
    assert torch.equal(trim.weight, glob.weight[IDS])
    assert torch.equal(init_rows(IDS, 8, std=0.02, seed=5), glob.weight.detach()[IDS])
    ids, rows = glob.export_rows()
    assert torch.equal(ids, torch.arange(V)) and torch.equal(rows, glob.weight)


def test_trim_loss_is_softmax_over_source_vocab_only():
    torch.manual_seed(0)
    model = build_model(model_preset("tiny"), Variant.TRIM, vocab_size=V, source_ids=IDS, seed=3)
    x = IDS[torch.randint(0, len(IDS), (2, 10))]
    y = IDS[torch.randint(0, len(IDS), (2, 10))]
    y[0, 0] = 5  # absent from V_k: ignored and counted
    y[1, 4] = 200
    h = model.hidden(x)
    local = torch.searchsorted(IDS, y)
    local[~torch.isin(y, IDS)] = -100
    want = F.cross_entropy((h @ model.embeddings.weight.T).reshape(-1, len(IDS)), local.reshape(-1))
    got = model(x, y)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert int(model.embeddings.ignored_targets) == 2
    # logits path is over V_k
    assert model(x).shape == (2, 10, len(IDS))


def test_trim_refuses_absent_inputs_and_bad_ids():
    emb = TrimEmbeddings(IDS, 8, vocab_size=V)
    with pytest.raises(ValueError, match="not held"):
        emb(torch.tensor([[3, 5]]))
    with pytest.raises(ValueError):
        TrimEmbeddings(torch.tensor([3, 1]), 8)
    with pytest.raises(ValueError):
        TrimEmbeddings(torch.tensor([3, 400]), 8, vocab_size=V)


def test_trim_state_dict_rebuilds_index():
    a = TrimEmbeddings(IDS, 8, vocab_size=V, seed=1)
    other = torch.tensor([1, 2, 3, 10, 20, 30, 40])
    b = TrimEmbeddings(other, 8, vocab_size=V, seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.export_rows()[0], IDS)
    assert torch.equal(b(torch.tensor([[17]])), a(torch.tensor([[17]])))


def test_spec_is_private_and_seeded():
    a, b, c = SpecEmbeddings(V, 8, 7), SpecEmbeddings(V, 8, 7), SpecEmbeddings(V, 8, 8)
    assert a.private and not GlobalEmbeddings(V, 8).private
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
