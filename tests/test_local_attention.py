"""The local-only baseline (attention.type=local): MSA's block budget with the most recent blocks."""

import pytest
import torch

from msa_megatron import ops
from msa_megatron.ops import reference as ref
from tests.msa_cases import make_case, naive_attention

BK, K = 4, 3


def test_selection_is_the_own_block_and_the_ones_right_before_it():
    cu = torch.tensor([0, 5, 19], dtype=torch.int32)  # documents of 5 and 14 tokens
    sel = ref.local_selection(cu, 19, BK, K, groups=2)
    assert sel.shape == (2, 19, K) and sel.dtype == torch.int32 and torch.equal(sel[0], sel[1])
    rows = sel[0].tolist()
    assert rows[0] == [0, -1, -1] and rows[4] == [0, 1, -1]  # document 1: blocks 0 and 1
    assert rows[5] == [0, -1, -1]  # document 2 starts its blocks at 0
    assert rows[5 + 8] == [0, 1, 2] and rows[5 + 12] == [1, 2, 3] and rows[18] == [1, 2, 3]
    # the contract layout: the local block in the last valid slot, -1 after it
    pos = torch.tensor(list(range(5)) + list(range(14)))
    for row, p in zip(rows, pos.tolist()):
        valid = [b for b in row if b >= 0]
        assert valid[-1] == p // BK and valid == list(range(p // BK - len(valid) + 1, p // BK + 1))
        assert len(valid) == min(p // BK + 1, K) and row[len(valid):] == [-1] * (K - len(valid))


def test_selection_of_a_query_subset_is_their_rows_of_the_whole():
    cu = torch.tensor([0, 7, 30, 31], dtype=torch.int32)
    whole = ref.local_selection(cu, 31, BK, K, groups=1)
    qpos = torch.tensor([0, 3, 6, 7, 20, 29, 30])
    assert torch.equal(ref.local_selection(cu, 31, BK, K, groups=1, qpos=qpos), whole[:, qpos])


def _window(cu, block_size, topk):
    """keep(g, i, j): key j is in one of the k most recent blocks of query i's document."""
    starts = {}
    for n in range(len(cu) - 1):
        for i in range(int(cu[n]), int(cu[n + 1])):
            starts[i] = int(cu[n])
    return lambda g, i, j: (i - starts[i]) // block_size - (j - starts[i]) // block_size < topk


def test_local_attention_is_attention_over_the_most_recent_blocks():
    c = make_case([40, 9, 23], block_size=BK, topk=K, seed=3)
    sel = ref.local_selection(c.cu_seqlens, c.q.shape[0], BK, K, groups=c.k.shape[1])
    o, lse = ref.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, BK)
    o_n, lse_n = naive_attention(c.q, c.k, c.v, c.cu_seqlens, _window(c.cu_seqlens, BK, K), c.q.shape[-1] ** -0.5)
    torch.testing.assert_close(o, o_n)
    torch.testing.assert_close(lse, lse_n)


def test_equals_dense_within_the_budget_and_differs_beyond():
    c = make_case([40, 12, 7], block_size=BK, topk=K, seed=4)  # budget K * BK = 12 tokens
    shape = ops.MSAShape(BK, K, c.q.shape[-1] ** -0.5, 1.0, 40)
    sel = ops.local_selection(c.cu_seqlens, c.q.shape[0], shape, c.k.shape[1])
    o_l, _ = ops.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, shape, "reference")
    o_d, _ = ops.dense_attention(c.q, c.k, c.v, c.cu_seqlens, shape, "reference")
    torch.testing.assert_close(o_l[:12], o_d[:12])  # positions < k*Bk see every block
    torch.testing.assert_close(o_l[40:], o_d[40:])  # documents of <= k*Bk tokens
    assert (o_l[12:40] - o_d[12:40]).abs().amax(dim=(1, 2)).min() > 1e-6  # past it every query drops keys


def test_only_recent_blocks_receive_gradient():
    c = make_case([37], block_size=BK, topk=K, seed=5, requires_grad=True)
    sel = ref.local_selection(c.cu_seqlens, 37, BK, K, groups=c.k.shape[1])
    o, _ = ref.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, BK)
    i = 36  # block 9: it attends blocks 7, 8, 9 = keys 28..36
    dk, dv = torch.autograd.grad(o[i].sum(), (c.k, c.v))
    touched = (dk.abs().sum(dim=(1, 2)) + dv.abs().sum(dim=(1, 2))) > 0
    assert touched.nonzero().flatten().tolist() == list(range(28, 37))


@pytest.fixture(scope="module")
def world():
    from msa_megatron.config import load_config
    from msa_megatron.training.distributed import init_distributed, shutdown

    init_distributed(load_config({}))
    yield
    shutdown()


def _model_and_logits(attention, seq, world):
    from msa_megatron.config import load_config, to_transformer_config
    from msa_megatron.data.mock import mock_batches
    from msa_megatron.model.builder import build_model

    cfg = load_config({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
                                 "kv_channels": 8, "vocab_size": 128, "num_moe_experts": None},
                       "attention": {"type": attention, "block_size": 8, "topk_blocks": 2}, "data": {"seq_length": seq}})
    torch.manual_seed(0)
    model = build_model(cfg, to_transformer_config(cfg, use_cpu_initialization=True))
    b = next(mock_batches(vocab_size=128, seq_length=seq, micro_batch_size=1, min_doc=seq, max_doc=seq + 8, seed=3))
    return model, model(b.tokens, b.position_ids, None, packed_seq_params=b.packed_seq_params())


def test_model_has_the_gqa_parameters_and_its_outputs_within_the_budget(world):
    local, out_local = _model_and_logits("local", 64, world)
    gqa, out_gqa = _model_and_logits("gqa", 64, world)
    names = {n: p.shape for n, p in local.named_parameters()}
    assert names == {n: p.shape for n, p in gqa.named_parameters()}
    assert not any("indexer" in n for n in names)
    budget = 8 * 2
    torch.testing.assert_close(out_local[:, :budget], out_gqa[:, :budget])  # same init, same first 16 positions
    assert (out_local[:, budget:] - out_gqa[:, budget:]).abs().max() > 1e-4


def test_flops_count_the_block_budget_and_no_index_branch():
    from msa_megatron import flops
    from msa_megatron.config import load_config

    base = {"attention": {"block_size": 16, "topk_blocks": 4}, "data": {"seq_length": 1024}}
    local = load_config({**base, "attention": {**base["attention"], "type": "local"}})
    msa = load_config(base)
    gqa = load_config({**base, "attention": {"type": "gqa"}})
    f = flops.forward_flops_per_token(local, sparse=False)
    assert f.attention_core == flops.forward_flops_per_token(msa, sparse=True).attention_core
    assert f.attention_core < flops.forward_flops_per_token(gqa, sparse=False).attention_core
    assert f.index_scores == f.index_projections == 0
