"""The MSA Triton kernels' logic on CPU, through the Triton interpreter, at tiny sizes.

Triton picks interpreter or compiler when a kernel is decorated, from TRITON_INTERPRET; setting it
in this process would leak into other tests. So the one test collected normally re-runs this file
in a subprocess with TRITON_INTERPRET=1 (and output poisoning on); only there are the real checks
defined. The parent fails unless every child test passed (none skipped).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch

CHILD = os.environ.get("MSA_TRITON_INTERPRET_CHILD") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if not CHILD:

    def test_triton_kernels_under_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1", MSA_TRITON_INTERPRET_CHILD="1", MSA_TRITON_POISON="1",
                   MSA_QUERY_CHUNK="48")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", "-W", "ignore::RuntimeWarning",
               os.path.abspath(__file__)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        summary = out.strip().splitlines()[-1]
        passed = re.search(r"(\d+) passed", summary)
        assert passed and int(passed.group(1)) >= 25, summary
        assert not re.search(r"skipped|failed|error|xfail", summary), summary

else:
    from msa_megatron.ops import MSAShape
    from msa_megatron.ops import reference as ref
    from msa_megatron.ops import triton as tri
    from msa_megatron.ops.triton.plan import build_plan
    from tests.test_triton_gpu import check_selection

    BK = 16
    # Block edges (1, Bk-1, Bk, Bk+1), more than k*Bk tokens, and a long one.
    LENGTHS = [1, 15, 16, 17, 40, 90]

    def rel(a, b):
        a, b = a.double(), b.double()
        assert torch.isfinite(a).all(), "non-finite (unwritten?) output"
        return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()

    def make(lengths, hq, hkv, d=16, di=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        total = sum(lengths)
        rnd = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        return rnd(total, hq, d), rnd(total, hkv, d), rnd(total, hkv, d), rnd(total, hkv, di), rnd(total, 1, di), cu

    def shape(d, di, k, lengths):
        return MSAShape(BK, k, 1 / math.sqrt(d), 1 / math.sqrt(di), max(lengths))

    @pytest.mark.parametrize("hq,hkv,k,di", [(4, 2, 3, 16), (3, 3, 1, 16), (8, 1, 5, 32), (2, 1, 8, 24)])
    def test_select_blocks(hq, hkv, k, di):
        _, _, _, qi, ki, cu = make(LENGTHS, hq, hkv, di=di, seed=1)
        sel, ilse = tri.select_blocks(qi, ki, cu, shape(16, di, k, LENGTHS))
        scores = ref.index_block_scores(qi.double(), ki.double(), cu, BK)
        check_selection(sel, ref.select_blocks(scores, cu, BK, k), scores, cu, BK, k)
        assert rel(ilse, ref.index_lse(qi.double(), ki.double(), sel, cu, BK)) < 1e-5

    def test_select_ties_pick_lower_ids():
        lengths = [150]
        _, _, _, qi, ki, cu = make(lengths, 2, 1, seed=2)
        sel, _ = tri.select_blocks(torch.zeros_like(qi), ki, cu, shape(16, 16, 4, lengths))
        assert sel[0, -1].tolist() == [0, 1, 2, 9]  # position 149: local block 9

    @pytest.mark.parametrize("lengths,chunk,short_keys", [(LENGTHS, 48, True), (LENGTHS, 48, False), ([520], 1, True)])
    def test_plan_is_the_selection_transposed(lengths, chunk, short_keys, monkeypatch):
        """Every valid (group, query, slot) sits in exactly one tile of its block and chunk, with
        segment keys sorted as int16 or as int32; [520] with 1-query chunks has 34320 segments,
        so its int16 keys span both signs."""
        from msa_megatron.ops.triton import plan as plan_mod

        monkeypatch.setattr(plan_mod, "SHORT_KEY_SEGMENTS", 1 << 16 if short_keys else 0)
        q, k, v, qi, ki, cu = make(lengths, 4, 2, seed=3)
        sel, _ = tri.select_blocks(qi, ki, cu, shape(16, 16, 3, lengths))
        plan = build_plan(sel, cu, BK, chunk=chunk)
        assert plan.n_chunks * plan.groups * plan.n_rows > 1 << 15 or lengths is LENGTHS
        layout = ref.doc_layout(cu, q.shape[0])
        want = {(g, i, s) for g in range(2) for i in range(q.shape[0]) for s in range(3) if sel[g, i, s] >= 0}
        got = []
        tiles = plan.tiles["fwd"].tiles.tolist()
        for g, row, e0, cnt in tiles:
            assert 0 <= cnt <= plan.tiles["fwd"].queries
            if cnt == 0:  # an unused slot of the chunk's fixed capacity
                continue
            for e in range(e0, e0 + cnt):
                i, s = int(plan.entry_tok[e]), int(plan.entry_slot[e])
                block = int(sel[g, i, s])
                assert int(plan.row_key_start[row]) == int(layout.doc_start[i]) + block * BK
                assert int(plan.row_key_end[row]) == int(cu[int(layout.doc_id[i]) + 1])
                got.append((g, i, s))
        assert len(got) == len(set(got)) and set(got) == want
        for c in range(plan.n_chunks):  # each chunk's tiles hold only that chunk's queries
            a, b = plan.chunk_bounds(c)
            t0, t1 = plan.tiles["fwd"].chunk_range(c)
            for g, row, e0, cnt in tiles[t0:t1]:
                toks = plan.entry_tok[e0 : e0 + cnt].tolist()
                assert all(a <= t < b for t in toks)
                assert toks == sorted(set(toks))  # a fixed (query) order: the kernels' sums are deterministic
        bwd = plan.tiles["bwd"]  # each segment's tiles are where seg_tile_first / seg_tile_count say
        for seg, (first, n) in enumerate(zip(bwd.seg_tile_first.tolist(), bwd.seg_tile_count.tolist())):
            g, row = (seg // plan.n_rows) % plan.groups, seg % plan.n_rows
            assert all(bwd.tiles[first + j, :2].tolist() == [g, row] for j in range(n))
        n_cls, seen = plan_mod.TILE_LENGTH_CLASSES, set()
        for tiles in plan.tiles.values():  # a chunk's programs take its own tiles, each once, longest first
            counts, q = tiles.tiles[:, 3].tolist(), tiles.queries

            def launch_class(t):  # full tiles, partial ones by length class (longer first), unused slots
                return 0 if counts[t] == q else n_cls if counts[t] == 0 else 1 + (q - counts[t]) * (n_cls - 1) // q

            for c in range(plan.n_chunks):
                t0, t1 = tiles.chunk_range(c)
                order = tiles.order[t0:t1].tolist()
                assert sorted(order) == list(range(t0, t1))
                keys = [(launch_class(t), t) for t in order]  # segment (slot) order within a class
                assert keys == sorted(keys)
                seen |= {k for k, _ in keys}
        assert len(seen) > 3 or lengths is not LENGTHS  # full tiles, partial ones of several classes, unused

    @pytest.mark.parametrize("hq,hkv,d,k,prefetch",
                             [(4, 2, 16, 3, False), (3, 1, 24, 2, True), (16, 1, 16, 5, True), (2, 2, 32, 1, False)])
    def test_sparse_attention(hq, hkv, d, k, prefetch, monkeypatch):
        """Outputs, lse and gradients against the float64 reference; the forward with and without
        its one-step-ahead query gather."""
        from msa_megatron.ops.triton import sparse_attn

        monkeypatch.setitem(sparse_attn.CONFIG, "fwd_prefetch", prefetch)
        q, kk, v, qi, ki, cu = make(LENGTHS, hq, hkv, d=d, seed=4)
        sh = shape(d, 16, k, LENGTHS)
        sel, _ = tri.select_blocks(qi, ki, cu, sh)
        qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, kk, v)]
        o, lse = tri.sparse_attention(qg, kg, vg, sel, cu, sh)
        do, dlse = torch.randn_like(o), torch.randn_like(lse) * 0.1
        torch.autograd.backward((o, lse), (do, dlse))
        qd, kd, vd = [t.double().requires_grad_(True) for t in (q, kk, v)]
        o_r, lse_r = ref.sparse_attention(qd, kd, vd, sel, cu, BK)
        torch.autograd.backward((o_r, lse_r), (do.double(), dlse.double()))
        assert o.dtype == q.dtype and rel(o, o_r) < 1e-2 and rel(lse, lse_r) < 1e-5
        for got, want in ((qg.grad, qd.grad), (kg.grad, kd.grad), (vg.grad, vd.grad)):
            assert rel(got, want) < 1e-2

    def test_sparse_attention_uses_the_selection():
        """Another valid selection must change the output (the kernel really reads topk)."""
        q, k, v, qi, ki, cu = make([90], 4, 2, seed=5)
        sh = shape(16, 16, 3, [90])
        sel, _ = tri.select_blocks(qi, ki, cu, sh)
        other = sel.clone()
        for g in range(2):
            for i in range(60, 90):  # local block >= 3: replace the first pick by an unpicked block
                row = sel[g, i].tolist()
                other[g, i, 0] = min(b for b in range(i // 16) if b not in row)
        o1, _ = tri.sparse_attention(q, k, v, sel, cu, sh)
        o2, _ = tri.sparse_attention(q, k, v, other, cu, sh)
        o2_r, _ = ref.sparse_attention(q.double(), k.double(), v.double(), other, cu, BK)
        assert rel(o2, o2_r) < 1e-2
        assert (o1[60:].float() - o2[60:].float()).abs().max() > 1e-2

    def test_local_baseline_through_the_kernels():
        """attention.type=local: the selection built from positions, then the sparse kernels, fwd and bwd
        (the whole batch and a context-parallel subset of its queries)."""
        from msa_megatron import ops

        q, k, v, _, _, cu = make(LENGTHS, 4, 2, seed=11)
        sh = shape(16, 16, 3, LENGTHS)
        sel = ops.local_selection(cu, q.shape[0], sh, 2)
        qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
        o, lse = ops.sparse_attention(qg, kg, vg, sel, cu, sh, "triton")
        do = torch.randn_like(o)
        torch.autograd.backward(o, do)
        qd, kd, vd = [t.double().requires_grad_(True) for t in (q, k, v)]
        o_r, lse_r = ref.sparse_attention(qd, kd, vd, sel, cu, BK)
        torch.autograd.backward(o_r, do.double())
        assert rel(o, o_r) < 1e-2 and rel(lse, lse_r) < 1e-5
        for got, want in ((qg.grad, qd.grad), (kg.grad, kd.grad), (vg.grad, vd.grad)):
            assert rel(got, want) < 1e-2
        qpos = torch.arange(1, q.shape[0], 3)
        sub = ops.local_selection(cu, q.shape[0], sh, 2, qpos=qpos)
        o_sub, _ = ops.sparse_attention(q[qpos], k, v, sub, cu, sh, "triton", qpos=qpos)
        assert rel(o_sub, o_r[qpos]) < 1e-2

    @pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (3, 1, 24)])
    def test_dense_attention(hq, hkv, d):
        lengths = [1, 15, 16, 17, 50]
        q, k, v, _, _, cu = make(lengths, hq, hkv, d=d, seed=6)
        qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
        o, lse = tri.dense_attention(qg, kg, vg, cu, shape(d, 16, 3, lengths))
        do, dlse = torch.randn_like(o), torch.randn_like(lse) * 0.1
        torch.autograd.backward((o, lse), (do, dlse))
        qd, kd, vd = [t.double().requires_grad_(True) for t in (q, k, v)]
        o_r, lse_r = ref.dense_attention(qd, kd, vd, cu)
        torch.autograd.backward((o_r, lse_r), (do.double(), dlse.double()))
        assert rel(o, o_r) < 1e-2 and rel(lse, lse_r) < 1e-5
        for got, want in ((qg.grad, qd.grad), (kg.grad, kd.grad), (vg.grad, vd.grad)):
            assert rel(got, want) < 1e-2

    @pytest.mark.parametrize("sparse", [True, False])
    @pytest.mark.parametrize("hq,hkv,k", [(4, 2, 3), (3, 1, 2), (2, 2, 3)])
    def test_indexer_kl(sparse, hq, hkv, k):
        q, kk, v, qi, ki, cu = make(LENGTHS, hq, hkv, seed=7)
        sh = shape(16, 16, k, LENGTHS)
        if sparse:
            sel, ilse = tri.select_blocks(qi, ki, cu, sh)
            _, lse = tri.sparse_attention(q, kk, v, sel, cu, sh)
        else:
            sel, ilse = None, None
            _, lse = tri.dense_attention(q, kk, v, cu, sh)
        qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        kl = tri.indexer_kl(q, kk, lse, qig, kig, ilse, sel, cu, sh, total_groups=3)
        (0.5 * kl).backward()
        args = (q.double(), kk.double(), qi.double(), ki.double(), cu, sel, BK)
        kl_r = ref.indexer_kl(*args, total_groups=3)
        dqi_r, dki_r = ref.indexer_kl_grads(*args, total_groups=3, coeff=0.5)
        assert kl.item() == pytest.approx(kl_r.item(), rel=1e-2)
        assert rel(qig.grad, dqi_r) < 1e-2 and rel(kig.grad, dki_r) < 1e-2

    @pytest.mark.parametrize("hq,hkv,k,tiny_tiles,bwd_rows",
                             [(4, 2, 3, False, 64), (16, 1, 5, False, 32), (2, 2, 3, True, 64), (8, 2, 4, True, 32)])
    def test_kl_computed_in_the_attention_backward(hq, hkv, k, tiny_tiles, bwd_rows, monkeypatch):
        """ops.sparse_attention_with_kl: o and dq/dk/dv as sparse_attention, the KL value (written
        by the backward) and dqi/dki as indexer_kl, over several query chunks (and tiles), with
        backward steps of 64 or 32 (query, head) rows."""
        from msa_megatron import ops
        from msa_megatron.ops.triton import plan as plan_mod
        from msa_megatron.ops.triton import sparse_attn

        monkeypatch.setitem(sparse_attn.CONFIG, "bwd_rows", bwd_rows)
        if tiny_tiles:
            monkeypatch.setattr(plan_mod, "TILE_QUERIES", {"fwd": 5, "bwd": 3, "kl": 4, "ilse": 6})
        q, kk, v, qi, ki, cu = make(LENGTHS, hq, hkv, seed=12)
        sh = shape(16, 16, k, LENGTHS)
        sel, ilse = tri.select_blocks(qi, ki, cu, sh)
        qg, kg, vg, qig, kig = [t.clone().requires_grad_(True) for t in (q, kk, v, qi, ki)]
        o, kl, value = ops.sparse_attention_with_kl(qg, kg, vg, qig, kig, sel, ilse, cu, sh, "triton", 3)
        assert kl.item() == 0.0 and math.isnan(value.item())  # the value arrives with the backward
        do = torch.randn_like(o)
        ((o.float() * do.float()).sum() + 0.5 * kl).backward()
        check_sparse_against_reference(q, kk, v, sel, cu, do, o, (qg.grad, kg.grad, vg.grad))
        args = (q.double(), kk.double(), qi.double(), ki.double(), cu, sel, BK)
        assert value.item() == pytest.approx(ref.indexer_kl(*args, total_groups=3).item(), rel=1e-3)
        dqi_r, dki_r = ref.indexer_kl_grads(*args, total_groups=3, coeff=0.5)
        assert rel(qig.grad, dqi_r) < 1e-2 and rel(kig.grad, dki_r) < 1e-2

    def test_kl_in_backward_only_where_a_step_holds_whole_queries():
        """3 heads per group do not tile a 64-row step: the caller is told to use the two ops."""
        from msa_megatron import ops

        q, kk, v, qi, ki, cu = make([40], 3, 1, seed=13)
        sh = shape(16, 16, 2, [40])
        sel, ilse = tri.select_blocks(qi, ki, cu, sh)
        assert ops.sparse_attention_with_kl(q, kk, v, qi, ki, sel, ilse, cu, sh, "triton", 1) is None

    def test_kl_is_zero_when_student_is_teacher():
        lengths = [40, 9]
        _, _, _, qi, ki, cu = make(lengths, 1, 1, seed=8)
        q = qi.repeat(1, 3, 1)  # 3 heads equal to the index query, k = ki, same scales
        sh = shape(16, 16, 2, lengths)
        sel, ilse = tri.select_blocks(qi, ki, cu, sh)
        _, lse = tri.sparse_attention(q, ki, ki, sel, cu, sh)
        kl = tri.indexer_kl(q, ki, lse, qi, ki, ilse, sel, cu, sh)
        assert abs(kl.item()) < 1e-4

    def test_blocks_split_over_several_programs(monkeypatch):
        """Tiny tiles: a block's queries span several programs, so the workspace sums run."""
        from msa_megatron.ops.triton import plan as plan_mod

        monkeypatch.setattr(plan_mod, "TILE_QUERIES", {"fwd": 5, "bwd": 3, "kl": 4, "ilse": 6})
        q, k, v, qi, ki, cu = make(LENGTHS, 4, 2, seed=9)
        sh = shape(16, 16, 3, LENGTHS)
        sel, ilse = tri.select_blocks(qi, ki, cu, sh)
        assert max(plan_mod.get_plan(sel, cu, BK, 48).tiles["bwd"].seg_tile_count.tolist()) > 1
        assert rel(ilse, ref.index_lse(qi.double(), ki.double(), sel, cu, BK)) < 1e-5
        qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
        o, lse = tri.sparse_attention(qg, kg, vg, sel, cu, sh)
        do = torch.randn_like(o)
        o.backward(do)
        check_sparse_against_reference(q, k, v, sel, cu, do, o, (qg.grad, kg.grad, vg.grad))
        qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        tri.indexer_kl(q, k, lse, qig, kig, ilse, sel, cu, sh).backward()
        dqi_r, dki_r = ref.indexer_kl_grads(q.double(), k.double(), qi.double(), ki.double(), cu, sel, BK)
        assert rel(qig.grad, dqi_r) < 1e-2 and rel(kig.grad, dki_r) < 1e-2

    @pytest.mark.parametrize("parts", [3])  # 6 zigzag chunks over 6 documents (the GPU test adds 2)
    def test_query_subsets_compute_the_rows_of_the_whole_batch(parts):
        """Twin of the reference's context-parallel test: a rank's queries (qpos, zigzag chunks whose
        edges are not block-aligned) give the rows of the whole batch, and the ranks' KL values and
        index gradients (dense and sparse support) and K/V gradients sum to the whole batch's."""
        from tests.msa_cases import triton_ops_on_rows
        from tests.test_reference import _zigzag_rows

        q, k, v, qi, ki, cu = make(LENGTHS, 4, 2, seed=11)
        sh = shape(16, 16, 3, LENGTHS)
        total = q.shape[0]
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(q.dtype)

        run = lambda rows: triton_ops_on_rows(tri, q, k, v, qi, ki, do, cu, sh, rows)
        full = run(None)
        for key, value in full["sparse_kl_in_bwd"].items():  # the training path == the separate ops
            assert rel(value, full["sparse"][key]) < (1e-5 if key == "kl" else 1e-3), key
        names = ("sparse", "sparse_kl_in_bwd", "dense")
        sums = {name: {key: 0.0 for key in ("dk", "dv", "kl", "dki")} for name in names}
        for rank in range(parts):
            rows = _zigzag_rows(total, parts, rank)
            got = run(rows)
            assert torch.equal(got["sel"], full["sel"][:, rows])
            assert rel(got["ilse"], full["ilse"][:, rows]) < 1e-6
            for name in names:
                mine, whole = got[name], full[name]
                for key in ("o", "lse", "dq", "dqi"):
                    assert rel(mine[key], whole[key][rows]) < 1e-3, (name, key)
                for key in sums[name]:
                    sums[name][key] = sums[name][key] + mine[key].double()
        for name in names:  # bf16 gradients: each rank's share is rounded on its own
            for key, value in sums[name].items():
                assert rel(value, full[name][key]) < (1e-5 if key == "kl" else 1e-2), (name, key)
        want = ref.indexer_kl(q.double(), k.double(), qi.double(), ki.double(), cu, None, BK)
        assert sums["dense"]["kl"].item() == pytest.approx(want.item(), rel=1e-3)

    def test_query_subset_of_one_document_edge():
        """A rank holding a single query (the last row) and one holding the first row of a document."""
        q, k, v, qi, ki, cu = make(LENGTHS, 4, 2, seed=13)
        sh = shape(16, 16, 3, LENGTHS)
        for rows in (torch.tensor([q.shape[0] - 1]), torch.tensor([1, 32, 33])):
            sel, ilse = tri.select_blocks(qi[rows], ki, cu, sh, qpos=rows)
            sel_r, ilse_r = ref.msa_indexer(qi.double()[rows], ki.double(), cu, BK, 3, qpos=rows)
            assert torch.equal(sel[..., -1], sel_r[..., -1])  # the local block in the last slot (k valid here)
            assert torch.equal(sel.sort(-1).values, sel_r.sort(-1).values) and rel(ilse, ilse_r) < 1e-5
            o, lse = tri.sparse_attention(q[rows], k, v, sel, cu, sh, qpos=rows)
            o_r, lse_r = ref.sparse_attention(q.double()[rows], k.double(), v.double(), sel, cu, BK, qpos=rows)
            assert rel(o, o_r) < 1e-2 and rel(lse, lse_r) < 1e-5

    @pytest.mark.parametrize("query_rows,block,rows,programs,tma,lse_t,lse_ahead,edges", [
        (True, 16, 16, 0, False, False, True, True), (False, 32, 16, 0, False, True, False, False),
        (True, 16, 16, 6, True, True, True, False), (False, 32, 16, 0, True, False, True, True),
    ])
    def test_dense_kl_tilings_match_the_reference(query_rows, block, rows, programs, tma, lse_t, lse_ahead, edges,
                                                  monkeypatch):
        """The dense KL's launch variants (tile orientation, keys per program, a tiny share budget
        that forces several query chunks, the dqi share sum in block segments, Q through a TMA
        descriptor, the lse read heads-major, each head's lse loaded one head ahead, the share
        buffer sized by the longest document from the host's edges) all compute the reference's
        value and gradients."""
        from msa_megatron.ops.triton import kl as klmod

        monkeypatch.setitem(klmod.CONFIG, "dense_lse_ahead", lse_ahead)
        monkeypatch.setitem(klmod.CONFIG, "dense_dqi_programs", programs)
        monkeypatch.setitem(klmod.CONFIG, "dense_query_rows", query_rows)
        monkeypatch.setitem(klmod.CONFIG, "dense_block", block)
        monkeypatch.setitem(klmod.CONFIG, "dense_rows", rows)
        monkeypatch.setitem(klmod.CONFIG, "dense_tma", tma)
        monkeypatch.setitem(klmod.CONFIG, "dense_lse_heads_major", lse_t)
        monkeypatch.setitem(klmod.CONFIG, "dense_ws_mib", 0)
        if tma:
            assert klmod._q_descriptor(torch.zeros(8, 4, 16, dtype=torch.bfloat16), rows) is not None
        q, k, v, qi, ki, cu = make(LENGTHS, 4, 2, seed=14)
        sh = shape(16, 16, 3, LENGTHS)
        if edges:
            sh = dataclasses.replace(sh, doc_edges=tuple(cu.tolist()))
            assert klmod._share_blocks(sh.doc_edges, cu, q.shape[0], block) < -(-q.shape[0] // block)
        _, lse = tri.dense_attention(q, k, v, cu, sh)
        check_kl_against_reference(q, k, lse, qi, ki, None, None, cu, sh, BK)

    @pytest.mark.parametrize("in_backward", [False, True])
    @pytest.mark.parametrize("split,query_rows", [(2, True), (2, False), (1, True), (1, False)])
    def test_sparse_kl_variants_match_the_reference(split, query_rows, in_backward, monkeypatch):
        """The sparse KL's launch variants (each block's keys split over programs, whose dqi
        partials slot_sum adds; either tile orientation) compute the reference's value and
        gradients, also when a block's queries span several tiles; on its own teacher (kl_*
        knobs) and on the one the attention backward built (kt_* knobs)."""
        from msa_megatron import ops
        from msa_megatron.ops.triton import kl as klmod
        from msa_megatron.ops.triton import plan as plan_mod

        knob = "kt_" if in_backward else "kl_"
        monkeypatch.setitem(klmod.CONFIG, knob + "split", split)
        monkeypatch.setitem(klmod.CONFIG, knob + "query_rows", query_rows)
        monkeypatch.setitem(klmod.CONFIG, knob + "rows", 16)
        monkeypatch.setitem(klmod.CONFIG, "kt_tiles", "bwd" if split == 1 else "kl")  # either tile list
        monkeypatch.setattr(plan_mod, "TILE_QUERIES", {"fwd": 128, "bwd": 24, "kl": 20, "ilse": 256})
        bk, lengths = 32, [1, 31, 32, 33, 90, 150]  # blocks of 32 keys: two slices of 16 (the smallest product)
        q, k, v, qi, ki, cu = make(lengths, 4, 2, seed=15)
        sh = MSAShape(bk, 3, 1 / math.sqrt(16), 1 / math.sqrt(16), max(lengths))
        sel, ilse = tri.select_blocks(qi, ki, cu, sh)
        tiles = plan_mod.get_plan(sel, cu, bk, 48).tiles
        assert tiles["kl"].seg_tile_count.max().item() > 1 and tiles["bwd"].seg_tile_count.max().item() > 1
        if not in_backward:
            _, lse = tri.sparse_attention(q, k, v, sel, cu, sh)
            check_kl_against_reference(q, k, lse, qi, ki, ilse, sel, cu, sh, bk)
            return
        qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        o, kl, value = ops.sparse_attention_with_kl(q.clone().requires_grad_(True), k, v, qig, kig, sel, ilse, cu, sh,
                                                    "triton", 3)
        torch.autograd.backward([o, kl], [torch.zeros_like(o), torch.ones_like(kl)])
        check_kl_grads(value, qig.grad, kig.grad, q, k, qi, ki, sel, cu, bk)

    def check_kl_against_reference(q, k, lse, qi, ki, ilse, sel, cu, sh, bk):
        """The Triton KL (3 groups in total) and its index gradients == the float64 reference."""
        qig, kig = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        kl = tri.indexer_kl(q, k, lse, qig, kig, ilse, sel, cu, sh, total_groups=3)
        kl.backward()
        check_kl_grads(kl, qig.grad, kig.grad, q, k, qi, ki, sel, cu, bk)

    def check_sparse_against_reference(q, k, v, sel, cu, do, o, grads):
        """o and (dq, dk, dv) of the sparse attention == the float64 reference's for the gradient do."""
        qd, kd, vd = [t.double().requires_grad_(True) for t in (q, k, v)]
        o_r, _ = ref.sparse_attention(qd, kd, vd, sel, cu, BK)
        o_r.backward(do.double())
        assert rel(o, o_r) < 1e-2
        for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
            assert rel(got, want) < 1e-2

    def check_kl_grads(kl, dqi, dki, q, k, qi, ki, sel, cu, bk):
        args = (q.double(), k.double(), qi.double(), ki.double(), cu, sel, bk)
        dqi_r, dki_r = ref.indexer_kl_grads(*args, total_groups=3)
        assert kl.item() == pytest.approx(ref.indexer_kl(*args, total_groups=3).item(), rel=1e-3)
        assert rel(dqi, dqi_r) < 1e-2 and rel(dki, dki_r) < 1e-2

    def test_slot_sums_address_partial_buffers_past_two_to_the_31_elements():
        """The combine and slot-sum kernels index [k, chunk, H, d] partials whose far slots lie past
        2^31 elements (k 17 at chunk 16384, 64 heads, d 128, the defaults past 32K): their offsets
        must be 64-bit. The buffers here are that large but untouched outside the rows used, so the
        allocation stays virtual. (Smaller buffers keep the faster int32 offsets: `wide`.)"""
        from msa_megatron.ops.triton import sparse_attn

        assert not sparse_attn.wide(torch.empty(2**31, device="meta"))  # last offset 2^31 - 1
        assert sparse_attn.wide(torch.empty(2**31 + 1, device="meta"))

        k, d, n = 17, 16, 2
        chunk = (1 << 31) // ((k - 1) * d)  # slot k-1 starts exactly at element 2^31
        g = torch.Generator().manual_seed(0)
        o_part = torch.empty((k, chunk, 1, d), dtype=torch.bfloat16)
        l_part = torch.empty((k, chunk, 1), dtype=torch.float32)
        assert sparse_attn.wide(o_part)
        o_part[:, :n] = torch.randn(k, n, 1, d, generator=g).to(torch.bfloat16)
        l_part[:, :n] = torch.randn(k, n, 1, generator=g)
        topk = torch.arange(k, dtype=torch.int32).expand(1, n, k).contiguous()
        w = torch.softmax(l_part[:, :n].double(), 0)  # [k, n, 1]
        want = (w[..., None] * o_part[:, :n].double()).sum(0)
        o = torch.zeros((n, 1, d), dtype=torch.bfloat16)
        lse = torch.zeros((n, 1), dtype=torch.float32)
        sparse_attn.combine(o_part, l_part, topk, o, lse, 0, n, 1)
        assert rel(o, want) < 1e-2
        assert rel(lse, torch.logsumexp(l_part[:, :n].double(), 0)) < 1e-6
        total = torch.zeros((n, 1, d), dtype=torch.float32)
        sparse_attn.slot_sum(o_part, topk, total, 0, n, 1.0, 1)
        assert rel(total, o_part[:, :n].double().sum(0)) < 1e-5
