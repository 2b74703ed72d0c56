"""The PyTorch oracle against independent per-query loops and the MSA.md properties."""

import math

import pytest
import torch

from msa_megatron.ops import reference as ref
from tests.msa_cases import make_case, naive_attention, naive_block_scores

# Document lengths around block edges: 1, Bk-1, Bk, Bk+1 and a few long ones (Bk = 4 here).
EDGE_LENGTHS = [1, 3, 4, 5, 23, 9, 31]


def selection_sets(topk):
    return {(g, i): {b for b in topk[g, i].tolist() if b >= 0} for g in range(topk.shape[0]) for i in range(topk.shape[1])}


def test_block_scores_match_naive_loop():
    c = make_case(EDGE_LENGTHS, seed=1)
    scale = 1 / math.sqrt(c.qi.shape[-1])
    got = ref.index_block_scores(c.qi, c.ki, c.cu_seqlens, c.block_size, chunk=5)
    want = naive_block_scores(c.qi, c.ki, c.cu_seqlens, c.block_size, scale)
    for (g, i), blocks in want.items():
        finite = {b for b in range(got.shape[-1]) if math.isfinite(got[g, i, b])}
        assert finite == set(blocks), (g, i)
        for b, s in blocks.items():
            assert got[g, i, b].item() == pytest.approx(s, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("topk", [1, 2, 3, 5])
def test_selection_layout_and_choice(topk):
    c = make_case(EDGE_LENGTHS, topk=topk, seed=2)
    scores = ref.index_block_scores(c.qi, c.ki, c.cu_seqlens, c.block_size)
    sel = ref.select_blocks(scores, c.cu_seqlens, c.block_size, topk)
    assert sel.dtype == torch.int32 and sel.shape == (c.qi.shape[1], c.qi.shape[0], topk)
    layout = ref.doc_layout(c.cu_seqlens, c.qi.shape[0])
    for g in range(sel.shape[0]):
        for i in range(sel.shape[1]):
            row = sel[g, i].tolist()
            local = int(layout.pos[i]) // c.block_size
            n_valid = min(local + 1, topk)
            assert all(b >= 0 for b in row[:n_valid]) and all(b == -1 for b in row[n_valid:]), row
            assert row[n_valid - 1] == local, row
            hist = row[: n_valid - 1]
            assert len(set(hist)) == len(hist) and all(0 <= b < local for b in hist), row
            # Non-local picks are exactly the best (k-1) by block score (lower id first on ties).
            ranked = sorted(range(local), key=lambda b: (-scores[g, i, b].item(), b))
            assert set(hist) == set(ranked[: n_valid - 1]), (row, ranked)


def test_ties_pick_lower_block_ids():
    c = make_case([40], topk=4, seed=3)
    zeros = torch.zeros_like(c.qi)  # every token scores 0: all blocks tie
    sel, _ = ref.msa_indexer(zeros, c.ki, c.cu_seqlens, c.block_size, c.topk)
    last = sel[:, -1].tolist()  # position 39, local block 9
    assert all(row == [0, 1, 2, 9] for row in last), last


def test_chunking_does_not_change_results():
    c = make_case(EDGE_LENGTHS, seed=4)
    sel_a, lse_a = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk, chunk=3)
    sel_b, lse_b = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk, chunk=1000)
    assert torch.equal(sel_a, sel_b)
    torch.testing.assert_close(lse_a, lse_b)
    o_a, l_a = ref.sparse_attention(c.q, c.k, c.v, sel_a, c.cu_seqlens, c.block_size, chunk=3)
    o_b, l_b = ref.sparse_attention(c.q, c.k, c.v, sel_a, c.cu_seqlens, c.block_size, chunk=1000)
    torch.testing.assert_close(o_a, o_b)
    torch.testing.assert_close(l_a, l_b)


def test_sparse_attention_matches_naive_loop_with_random_selection():
    c = make_case(EDGE_LENGTHS, seed=5)
    g = torch.Generator().manual_seed(0)
    layout = ref.doc_layout(c.cu_seqlens, c.q.shape[0])
    # An arbitrary (not indexer-made) valid selection: random visible blocks, local last.
    sel = torch.full((c.k.shape[1], c.q.shape[0], c.topk), -1, dtype=torch.int32)
    for grp in range(sel.shape[0]):
        for i in range(sel.shape[1]):
            local = int(layout.pos[i]) // c.block_size
            hist = torch.randperm(local, generator=g)[: c.topk - 1].tolist() if local else []
            row = hist + [local]
            sel[grp, i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    sets = selection_sets(sel)
    starts = layout.doc_start
    keep = lambda grp, i, j: (j - int(starts[i])) // c.block_size in sets[(grp, i)]
    scale = 1 / math.sqrt(c.q.shape[-1])
    o, lse = ref.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, c.block_size, chunk=6)
    o_want, lse_want = naive_attention(c.q, c.k, c.v, c.cu_seqlens, keep, scale)
    torch.testing.assert_close(o, o_want)
    torch.testing.assert_close(lse, lse_want)


def test_dense_attention_matches_sdpa_per_document():
    c = make_case([7, 16, 1, 12], hq=6, hkv=2, seed=6)
    o, lse = ref.dense_attention(c.q, c.k, c.v, c.cu_seqlens, chunk=5)
    for n in range(len(c.lengths)):
        d = c.doc(n)
        a, b = int(c.cu_seqlens[n]), int(c.cu_seqlens[n + 1])
        want = torch.nn.functional.scaled_dot_product_attention(
            d.q.transpose(0, 1), d.k.transpose(0, 1), d.v.transpose(0, 1), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        torch.testing.assert_close(o[a:b], want)


@pytest.mark.parametrize("block_size,topk,lengths", [(4, 3, [12, 5, 9]), (128, 16, [2048, 300])])
def test_msa_equals_dense_for_short_documents(block_size, topk, lengths):
    """Documents <= k*Bk tokens select every visible block: outputs and gradients equal dense."""
    d = 8 if block_size == 128 else 8
    c = make_case(lengths, block_size=block_size, topk=topk, d=d, di=d, seed=7, requires_grad=True)
    sel, _ = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, block_size, topk)
    o_s, lse_s = ref.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, block_size)
    o_d, lse_d = ref.dense_attention(c.q, c.k, c.v, c.cu_seqlens)
    torch.testing.assert_close(o_s, o_d)
    torch.testing.assert_close(lse_s, lse_d)
    w = torch.randn_like(o_s)
    g_s = torch.autograd.grad((o_s * w).sum(), (c.q, c.k, c.v))
    g_d = torch.autograd.grad((o_d * w).sum(), (c.q, c.k, c.v))
    for a, b in zip(g_s, g_d):
        torch.testing.assert_close(a, b)


def test_msa_differs_from_dense_beyond_budget():
    """Past k*Bk tokens the selection drops blocks, so MSA must stop being dense attention."""
    c = make_case([40], block_size=4, topk=3, seed=8)
    sel, _ = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, 4, 3)
    o_s, _ = ref.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, 4)
    o_d, _ = ref.dense_attention(c.q, c.k, c.v, c.cu_seqlens)
    torch.testing.assert_close(o_s[:12], o_d[:12])
    assert (o_s[12:] - o_d[12:]).abs().max() > 1e-3


def test_packed_batch_equals_documents_alone():
    """No cross-document leakage: every output of a packed batch equals its document run alone."""
    c = make_case(EDGE_LENGTHS, seed=9)
    sel, ilse = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk)
    o, lse = ref.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, c.block_size)
    kl = ref.indexer_kl(c.q, c.k, c.qi, c.ki, c.cu_seqlens, sel, c.block_size)
    kl_dense = ref.indexer_kl(c.q, c.k, c.qi, c.ki, c.cu_seqlens, None)
    total = c.q.shape[0]
    kl_sum = kl_dense_sum = 0.0
    for n, length in enumerate(c.lengths):
        d = c.doc(n)
        a, b = int(c.cu_seqlens[n]), int(c.cu_seqlens[n + 1])
        sel_n, ilse_n = ref.msa_indexer(d.qi, d.ki, d.cu_seqlens, c.block_size, c.topk)
        o_n, lse_n = ref.sparse_attention(d.q, d.k, d.v, sel_n, d.cu_seqlens, c.block_size)
        assert torch.equal(sel[:, a:b], sel_n)
        torch.testing.assert_close(ilse[:, a:b], ilse_n)
        torch.testing.assert_close(o[a:b], o_n)
        torch.testing.assert_close(lse[a:b], lse_n)
        kl_sum += ref.indexer_kl(d.q, d.k, d.qi, d.ki, d.cu_seqlens, sel_n, c.block_size).item() * length
        kl_dense_sum += ref.indexer_kl(d.q, d.k, d.qi, d.ki, d.cu_seqlens, None).item() * length
    assert kl.item() == pytest.approx(kl_sum / total, rel=1e-12)
    assert kl_dense.item() == pytest.approx(kl_dense_sum / total, rel=1e-12)


def test_changing_one_document_leaves_the_others_alone():
    c = make_case([9, 14, 6], seed=10)
    sel, ilse = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk)
    o, lse = ref.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, c.block_size)
    for t in c.tensors():
        t.data[9:23] += torch.randn_like(t.data[9:23])  # perturb document 1 only
    sel2, ilse2 = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk)
    o2, lse2 = ref.sparse_attention(c.q, c.k, c.v, sel2, c.cu_seqlens, c.block_size)
    for rows in (slice(0, 9), slice(23, 29)):
        assert torch.equal(sel[:, rows], sel2[:, rows])
        assert torch.equal(ilse[:, rows], ilse2[:, rows])
        assert torch.equal(o[rows], o2[rows]) and torch.equal(lse[rows], lse2[rows])
    assert not torch.equal(o[9:23], o2[9:23])


def test_index_lse_is_logsumexp_over_selected_tokens():
    c = make_case([21, 8], seed=11)
    sel, ilse = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk)
    sets = selection_sets(sel)
    scale = 1 / math.sqrt(c.qi.shape[-1])
    layout = ref.doc_layout(c.cu_seqlens, c.qi.shape[0])
    for (g, i), blocks in sets.items():
        s0 = int(layout.doc_start[i])
        js = [j for j in range(s0, i + 1) if (j - s0) // c.block_size in blocks]
        want = torch.logsumexp(torch.stack([(c.qi[i, g] * c.ki[j, 0]).sum() * scale for j in js]), 0)
        assert ilse[g, i].item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("sparse", [True, False])
def test_kl_nonnegative_and_zero_when_student_is_teacher(sparse):
    c = make_case([17, 11], hq=3, hkv=1, d=8, di=8, seed=12)
    sel = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk)[0] if sparse else None
    kl = ref.indexer_kl(c.q, c.k, c.qi, c.ki, c.cu_seqlens, sel, c.block_size)
    assert kl.item() > 1e-6
    # Student == teacher: one group, all query heads equal to the index query, k equal to ki.
    q_same = c.qi.repeat(1, 3, 1)
    k_same = c.ki.clone()
    kl0 = ref.indexer_kl(q_same, k_same, c.qi, c.ki, c.cu_seqlens, sel, c.block_size)
    assert abs(kl0.item()) < 1e-12


@pytest.mark.parametrize("sparse", [True, False])
def test_kl_closed_form_gradient_matches_autograd(sparse):
    c = make_case(EDGE_LENGTHS, seed=13, requires_grad=True)
    sel = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk)[0] if sparse else None
    coeff = 0.37
    kl = ref.indexer_kl(c.q, c.k, c.qi, c.ki, c.cu_seqlens, sel, c.block_size, total_groups=5)
    g_q, g_k, g_qi, g_ki = torch.autograd.grad(coeff * kl, (c.q, c.k, c.qi, c.ki), allow_unused=True)
    assert g_q is None and g_k is None  # the teacher is detached
    dqi, dki = ref.indexer_kl_grads(
        c.q, c.k, c.qi, c.ki, c.cu_seqlens, sel, c.block_size, total_groups=5, coeff=coeff, chunk=4
    )
    torch.testing.assert_close(dqi, g_qi)
    torch.testing.assert_close(dki, g_ki)


def test_recall_is_one_for_the_oracle_selection_and_lower_for_a_poor_one():
    c = make_case([64, 30], hq=4, hkv=2, seed=14)
    # Oracle selection: the main branch's own top-k by block mass (recomputed densely here).
    total = c.q.shape[0]
    layout = ref.doc_layout(c.cu_seqlens, total)
    nb = ref.num_blocks(c.cu_seqlens, c.block_size)
    scale = 1 / math.sqrt(c.q.shape[-1])
    best = torch.full((2, total, c.topk), -1, dtype=torch.int32)
    worst = best.clone()
    for i in range(total):
        s0 = int(layout.doc_start[i])
        local = int(layout.pos[i]) // c.block_size
        for g in range(2):
            s = torch.stack([(c.q[i, 2 * g : 2 * g + 2] * c.k[j, g]).sum(-1) * scale for j in range(s0, i + 1)], 1)
            p = torch.softmax(s, 1).mean(0)
            mass = torch.zeros(nb, dtype=p.dtype).index_add_(0, (torch.arange(s0, i + 1) - s0) // c.block_size, p)
            order = sorted(range(local + 1), key=lambda b: (-mass[b].item(), b))
            top = order[: c.topk]
            best[g, i, : len(top)] = torch.tensor(top, dtype=torch.int32)
            bottom = order[-c.topk :] if local + 1 > c.topk else top
            worst[g, i, : len(bottom)] = torch.tensor(bottom, dtype=torch.int32)
    br, sr = ref.selection_recall(c.q, c.k, best, c.cu_seqlens, c.block_size)
    assert br == pytest.approx(1.0) and sr == pytest.approx(1.0)
    br2, sr2 = ref.selection_recall(c.q, c.k, worst, c.cu_seqlens, c.block_size)
    assert 0.0 <= br2 < 1.0 and 0.0 <= sr2 < 1.0
    assert ref.selection_recall(c.q[:10], c.k[:10], best[:, :10], torch.tensor([0, 10], dtype=torch.int32), c.block_size) == (None, None)


def test_half_precision_inputs_return_their_dtype_and_track_float64():
    c64 = make_case([40, 13], seed=15)
    cb = make_case([40, 13], seed=15, dtype=torch.bfloat16)
    sel, _ = ref.msa_indexer(c64.qi, c64.ki, c64.cu_seqlens, 4, 3)
    o64, _ = ref.sparse_attention(c64.q, c64.k, c64.v, sel, c64.cu_seqlens, 4)
    ob, lb = ref.sparse_attention(cb.q, cb.k, cb.v, sel, cb.cu_seqlens, 4)
    assert ob.dtype == torch.bfloat16 and lb.dtype == torch.float32
    err = (ob.double() - o64).norm() / o64.norm()
    assert err < 1e-2


def test_eight_k_tokens_run_chunked():
    """An 8K-token packed batch at Bk 128, k 16: the chunked path keeps memory and time small."""
    c = make_case([8192 - 3000, 3000], hq=2, hkv=1, d=16, di=16, block_size=128, topk=16, dtype=torch.float32, seed=16)
    sel, ilse = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, 128, 16)
    o, lse = ref.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, 128)
    assert torch.isfinite(o).all() and torch.isfinite(ilse).all()
    valid = (sel >= 0).sum(-1)
    assert int(valid.max()) == 16 and int(valid[0, 0]) == 1


@pytest.mark.parametrize("sparse", [True, False])
def test_kl_value_matches_naive_loop(sparse):
    """Teacher = mean over the group's heads of each head's softmax (probability space)."""
    c = make_case([13, 10], hq=6, hkv=2, seed=17)
    sel = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk)[0] if sparse else None
    kl = ref.indexer_kl(c.q, c.k, c.qi, c.ki, c.cu_seqlens, sel, c.block_size)
    layout = ref.doc_layout(c.cu_seqlens, c.q.shape[0])
    sets = selection_sets(sel) if sparse else None
    scale = 1 / math.sqrt(c.q.shape[-1])
    total, acc = c.q.shape[0], 0.0
    for i in range(total):
        s0 = int(layout.doc_start[i])
        for g in range(2):
            js = [j for j in range(s0, i + 1) if sets is None or (j - s0) // c.block_size in sets[(g, i)]]
            heads = [torch.softmax(torch.stack([(c.q[i, h] * c.k[j, g]).sum() * scale for j in js]), 0) for h in range(3 * g, 3 * g + 3)]
            p_t = torch.stack(heads).mean(0)
            p_s = torch.softmax(torch.stack([(c.qi[i, g] * c.ki[j, 0]).sum() * scale for j in js]), 0)
            acc += float((p_t * (p_t.log() - p_s.log())).sum())
    assert kl.item() == pytest.approx(acc / (total * 2), rel=1e-10)


def test_recall_sample_is_an_even_deterministic_subset_of_the_eligible_queries():
    c = make_case([40, 9, 64], hq=4, hkv=2, seed=23)
    layout = ref.doc_layout(c.cu_seqlens, c.q.shape[0])
    eligible = torch.nonzero(layout.pos // c.block_size + 1 > c.topk).squeeze(1)
    assert torch.equal(ref.recall_sample(c.cu_seqlens, c.q.shape[0], c.block_size, c.topk, 0), eligible)
    assert torch.equal(ref.recall_sample(c.cu_seqlens, c.q.shape[0], c.block_size, c.topk, 10_000), eligible)
    rows = ref.recall_sample(c.cu_seqlens, c.q.shape[0], c.block_size, c.topk, 7)
    assert rows.numel() == 7 and torch.isin(rows, eligible).all() and (rows[1:] > rows[:-1]).all()
    assert rows[0] == eligible[0] and rows[-1] > eligible[eligible.numel() * 6 // 7 - 1]  # spread to the end
    # A rank's queries (qpos): rows index its own queries, all eligible.
    qpos = _zigzag_rows(c.q.shape[0], 2, 1)
    sub = ref.recall_sample(c.cu_seqlens, c.q.shape[0], c.block_size, c.topk, 5, qpos=qpos)
    assert sub.numel() == 5 and torch.isin(qpos[sub], eligible).all()


def test_sampled_recall_equals_the_full_recall_on_its_rows():
    from msa_megatron import ops

    c = make_case([40, 9, 64], hq=4, hkv=2, seed=24)
    sel, _ = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk)
    full = ref.selection_recall(c.q, c.k, sel, c.cu_seqlens, c.block_size)
    assert ref.sampled_selection_recall(c.q, c.k, sel, c.cu_seqlens, c.block_size, 0) == pytest.approx(full)
    rows = ref.recall_sample(c.cu_seqlens, c.q.shape[0], c.block_size, c.topk, 9)
    want = ref.selection_recall(c.q[rows], c.k, sel[:, rows], c.cu_seqlens, c.block_size, qpos=rows)
    got = ref.sampled_selection_recall(c.q, c.k, sel, c.cu_seqlens, c.block_size, 9)
    assert got == pytest.approx(want) and got != pytest.approx(full)
    shape = ops.MSAShape(c.block_size, c.topk, 1 / math.sqrt(c.q.shape[-1]), 1.0, 64)
    for backend in ("reference", "triton"):  # the same sample and numbers on both backends
        assert ops.selection_recall(c.q, c.k, sel, c.cu_seqlens, shape, backend, 9) == pytest.approx(want)
    qpos = _zigzag_rows(c.q.shape[0], 2, 0)
    sub = ref.recall_sample(c.cu_seqlens, c.q.shape[0], c.block_size, c.topk, 6, qpos=qpos)
    want = ref.selection_recall(c.q[qpos[sub]], c.k, sel[:, qpos[sub]], c.cu_seqlens, c.block_size, qpos=qpos[sub])
    got = ops.selection_recall(c.q[qpos], c.k, sel[:, qpos], c.cu_seqlens, shape, "reference", 6, qpos=qpos)
    assert got == pytest.approx(want)


def _zigzag_rows(total: int, parts: int, rank: int) -> torch.Tensor:
    """Context-parallel style: 2*parts chunks, this rank keeps chunks rank and 2*parts-1-rank."""
    edges = [total * c // (2 * parts) for c in range(2 * parts + 1)]
    keep = [rank, 2 * parts - 1 - rank]
    return torch.cat([torch.arange(edges[c], edges[c + 1]) for c in sorted(keep)])


@pytest.mark.parametrize("parts", [2, 3])
def test_query_subsets_compute_the_rows_of_the_whole_batch(parts):
    """qpos (queries = a subset of the key rows) gives exactly those rows of the full computation,
    and the ranks' KL values and gradients sum to the full ones (the context-parallel contract)."""
    c = make_case(EDGE_LENGTHS, seed=21, requires_grad=True)
    total = c.q.shape[0]
    sel, ilse = ref.msa_indexer(c.qi, c.ki, c.cu_seqlens, c.block_size, c.topk)
    o, lse = ref.sparse_attention(c.q, c.k, c.v, sel, c.cu_seqlens, c.block_size)
    od, lsed = ref.dense_attention(c.q, c.k, c.v, c.cu_seqlens)
    kl_full = ref.indexer_kl(c.q, c.k, c.qi, c.ki, c.cu_seqlens, sel, c.block_size)
    dqi_full, dki_full = torch.autograd.grad(kl_full, (c.qi, c.ki))
    kl_sum, dqi_sum, dki_sum = 0.0, torch.zeros_like(c.qi), torch.zeros_like(c.ki)
    for rank in range(parts):
        rows = _zigzag_rows(total, parts, rank)
        q, qi = c.q[rows], c.qi[rows]
        sel_r, ilse_r = ref.msa_indexer(qi, c.ki, c.cu_seqlens, c.block_size, c.topk, qpos=rows)
        assert torch.equal(sel_r, sel[:, rows])
        torch.testing.assert_close(ilse_r, ilse[:, rows], rtol=1e-12, atol=1e-12)
        o_r, lse_r = ref.sparse_attention(q, c.k, c.v, sel_r, c.cu_seqlens, c.block_size, qpos=rows)
        torch.testing.assert_close(o_r, o[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse_r, lse[rows], rtol=1e-12, atol=1e-12)
        od_r, lsed_r = ref.dense_attention(q, c.k, c.v, c.cu_seqlens, qpos=rows, chunk=7)
        torch.testing.assert_close(od_r, od[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lsed_r, lsed[rows], rtol=1e-12, atol=1e-12)
        kl_r = ref.indexer_kl(q, c.k, qi, c.ki, c.cu_seqlens, sel_r, c.block_size, qpos=rows)
        dqi_r, dki_r = torch.autograd.grad(kl_r, (c.qi, c.ki))
        kl_sum, dqi_sum, dki_sum = kl_sum + kl_r, dqi_sum + dqi_r, dki_sum + dki_r
        grads = ref.indexer_kl_grads(q, c.k, qi, c.ki, c.cu_seqlens, sel_r, c.block_size, qpos=rows)
        torch.testing.assert_close(grads[0], dqi_r[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads[1], dki_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kl_sum, kl_full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dqi_sum, dqi_full, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dki_sum, dki_full, rtol=1e-10, atol=1e-14)


def test_query_positions_must_be_increasing_key_rows():
    c = make_case([8, 8], seed=22)
    with pytest.raises(ValueError, match="qpos"):
        ref.dense_attention(c.q[:2], c.k, c.v, c.cu_seqlens, qpos=torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="qpos"):
        ref.dense_attention(c.q[:1], c.k, c.v, c.cu_seqlens, qpos=torch.tensor([16]))
