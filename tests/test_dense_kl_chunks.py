"""How the dense KL splits its query rows into passes (host arithmetic only, no kernels)."""

from __future__ import annotations

import pytest
import torch

from msa_megatron.ops.triton import kl as klmod


def test_share_blocks_trust_only_edges_that_describe_the_keys():
    """The share buffer has the longest document's blocks only where the host's edges are this
    batch's (same count, 0 .. n_keys); else every key block (a wrong bound would write shares past
    the buffer)."""
    cu = torch.tensor([0, 5, 40, 50], dtype=torch.int32)
    assert klmod._share_blocks((0, 5, 40, 50), cu, 50, 16) == 3  # 35 keys: 3 blocks of 16
    assert klmod._share_blocks(None, cu, 50, 16) == 4
    assert klmod._share_blocks((0, 5, 50), cu, 50, 16) == 4  # another batch's count of documents
    assert klmod._share_blocks((0, 5, 40, 60), cu, 50, 16) == 4  # ends past the keys
    assert klmod._share_blocks((0,), cu[:1], 0, 16) == 1


@pytest.mark.parametrize("n_q,n_blocks,mib,by_row", [
    (131072, 1024, 2048, True), (131072, 1024, 2048, False), (65536, 256, 2048, True), (32768, 256, 2048, True),
    (1000, 8, 0, True), (300, 3, 1, False),
])
def test_query_chunks_tile_the_rows_within_the_budget(n_q, n_blocks, mib, by_row, monkeypatch):
    """Chunks cover [0, n_q) in order; each has room for every block its rows can have shares
    from (the first q // block + 1 when rows are positions, else all); each fits the budget, or is
    one step of dense_rows when nothing larger does."""
    monkeypatch.setitem(klmod.CONFIG, "dense_ws_mib", mib)
    groups, di, itemsize, block, step = 4, 128, 2, 128, klmod.CONFIG["dense_rows"]
    chunks = klmod._dense_query_chunks(n_q, groups, n_blocks, di, itemsize, block, by_row)
    budget = (mib << 20) // (groups * di * itemsize)
    assert chunks[0][0] == 0 and chunks[-1][1] == n_q
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for q0, q1, blocks in chunks:
        assert blocks == (min(n_blocks, (q1 - 1) // block + 1) if by_row else n_blocks)
        assert (q1 - q0) * blocks <= budget or q1 - q0 <= step
        assert (q1 - q0) % step == 0 or q1 == n_q
    for (q0, q1, _), nxt in zip(chunks, chunks[1:]):  # each chunk is as long as the budget lets it be
        longer = min(q1 + step, n_q)
        assert (longer - q0) * (min(n_blocks, (longer - 1) // block + 1) if by_row else n_blocks) > budget


def test_early_rows_of_a_long_document_take_bigger_chunks(monkeypatch):
    """At 128K (4 groups, di 128, bf16 shares, 2 GiB) positions halve the passes: 64 -> 34."""
    monkeypatch.setitem(klmod.CONFIG, "dense_ws_mib", 2048)
    by_row = klmod._dense_query_chunks(131072, 4, 1024, 128, 2, 128, True)
    fixed = klmod._dense_query_chunks(131072, 4, 1024, 128, 2, 128, False)
    assert len(fixed) == 64 and len(by_row) < 40
    assert by_row[0][1] - by_row[0][0] == 16384 and {q1 - q0 for q0, q1, _ in fixed} == {2048}
