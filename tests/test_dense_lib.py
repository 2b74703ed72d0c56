"""Per-document library calls of the dense attention (dense_lib's cudnn_docs), on the CPU: which
documents go to which call, when the dispatch may use them, and that the calls' pieces and their
saved states add up to the whole batch (the library kernels replaced by the float64 reference)."""

import itertools

import pytest
import torch

from msa_megatron.data.batch import pack_samples
from msa_megatron.ops import reference
from msa_megatron.ops.triton import dense_lib


def _edges(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


@pytest.mark.parametrize(
    "lengths,want",
    [
        ([5, 50, 3, 2, 60, 1], [(0, 1, "flash"), (1, 2, "cudnn_batched"), (2, 4, "flash"), (4, 5, "cudnn_batched"), (5, 6, "flash")]),
        ([40, 39, 41], [(0, 1, "cudnn_batched"), (1, 2, "flash"), (2, 3, "cudnn_batched")]),  # 40 is long
        ([1, 2, 3], [(0, 3, "flash")]),
        ([90, 45], [(0, 1, "cudnn_batched"), (1, 2, "cudnn_batched")]),
        ([7, 0, 8, 50, 0], [(0, 3, "flash"), (3, 4, "cudnn_batched"), (4, 5, "flash")]),  # empty documents
    ],
)
def test_long_documents_alone_and_runs_of_short_ones_together(lengths, want):
    assert dense_lib.doc_segments(_edges(lengths), long_doc=40) == want


def test_batch_kind_needs_host_edges_that_match_the_rows():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    q = torch.zeros(10, 2, 4)
    assert dense_lib.batch_kind(q, cu, 7) == "varlen"
    assert dense_lib.batch_kind(q, cu, 7, (0, 3, 10)) == "docs"
    assert dense_lib.batch_kind(q, cu, 7, (0, 3, 9)) == "varlen"  # not these rows
    assert dense_lib.batch_kind(q, cu, 7, (0, 10)) == "varlen"  # another number of documents
    uniform = torch.tensor([0, 5, 10], dtype=torch.int32)
    assert dense_lib.batch_kind(q, uniform, 5, (0, 5, 10)) == "uniform"  # from shapes: one batched call


def test_per_document_calls_give_the_whole_batch_and_its_gradients(monkeypatch):
    """Every call's rows, cu_seqlens, max_seqlen and saved state reach its own backward: with the
    library calls replaced by the float64 reference, o, lse and the gradients are the batch's."""
    monkeypatch.setattr(dense_lib, "LONG_DOC", 40)
    lengths = [3, 45, 2, 0, 7, 41, 0]  # the last run has only an empty document: no call
    edges = _edges(lengths)
    cu = torch.tensor(edges, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(edges[-1], h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2, 4))
    real_forward, real_backward = dense_lib.forward, dense_lib.backward
    calls = []

    def fake_forward(name, q, k, v, cu, max_seqlen, scale, edges=None):
        if name == "cudnn_docs":
            return real_forward(name, q, k, v, cu, max_seqlen, scale, edges)
        lengths = (cu[1:] - cu[:-1]).tolist()
        assert cu[0] == 0 and cu[-1] == q.shape[0] and max_seqlen == max(lengths)
        assert (name == "cudnn_batched") == (len(lengths) == 1 and lengths[0] >= 40)
        calls.append((name, lengths))
        o, lse = reference.dense_attention(q, k, v, cu, scale)
        tag = q.sum().reshape(1)  # which call this state belongs to
        return o, lse, ((o.transpose(0, 1)[None] * 0, tag, tag, tag) if name == "cudnn_batched" else (tag, tag, tag))

    def fake_backward(name, do, q, k, v, o, state, cu, max_seqlen, scale, edges=None):
        if name == "cudnn_docs":
            return real_backward(name, do, q, k, v, o, state, cu, max_seqlen, scale, edges)
        assert torch.equal(state[-1], q.sum().reshape(1))
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        o_ref, _ = reference.dense_attention(*leaves, cu, scale)
        if name == "cudnn_batched":  # cuDNN's o [1, H, S, d], read back from the packed o
            assert state[0].shape == (1, q.shape[1], q.shape[0], q.shape[2])
            assert torch.allclose(state[0][0].transpose(0, 1), o_ref)
        return torch.autograd.grad(o_ref, leaves, do)

    monkeypatch.setattr(dense_lib, "forward", fake_forward)
    monkeypatch.setattr(dense_lib, "backward", fake_backward)
    o, lse, state = dense_lib.forward("cudnn_docs", q, k, v, cu, max(lengths), 0.3, edges)
    assert calls == [("flash", [3]), ("cudnn_batched", [45]), ("flash", [2, 0, 7]), ("cudnn_batched", [41])]
    grads = dense_lib.backward("cudnn_docs", do, q, k, v, o, state, cu, max(lengths), 0.3, edges)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o_ref, lse_ref = reference.dense_attention(*leaves, cu, 0.3)
    assert torch.allclose(o, o_ref) and torch.allclose(lse, lse_ref.float())
    for got, want in zip(grads, torch.autograd.grad(o_ref, leaves, do)):
        assert torch.allclose(got, want)


def test_packed_batches_carry_their_edges_to_the_attention_layers():
    eod = 0
    samples = [torch.tensor([5, 6, 0, 7, 8, 9, 0, 4, 3]), torch.tensor([1, 2, 3, 0, 5, 6, 7, 8, 9])]
    batch = pack_samples(samples, eod)
    assert batch.cu_seqlens_host == tuple(batch.cu_seqlens.tolist()) == (0, 3, 7, 8, 12, 16)
    moved = batch.to("cpu")
    assert moved.cu_seqlens_host == batch.cu_seqlens_host
    assert moved.packed_seq_params().cu_seqlens_host == batch.cu_seqlens_host
    split = batch.split_for_context_parallel(sample_len=8, cp_size=2, cp_rank=1)
    assert split.packed_seq_params().cu_seqlens_host == batch.cu_seqlens_host
