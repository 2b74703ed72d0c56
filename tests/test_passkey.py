"""data=passkey (synthetic long-range retrieval) and the validation metrics it feeds."""

import pytest
import torch

from msa_megatron.data.passkey import NUM_DIGITS, PasskeyDocuments, passkey_batches
from msa_megatron.training import evaluation

V = 512


def stream(**kw):
    args = dict(vocab_size=V, seq_length=2048, micro_batch_size=1, min_doc=1024, max_doc=2048, pairs=12, digits=4, seed=5)
    return passkey_batches(**{**args, **kw})


def test_every_answer_row_predicts_the_value_stored_that_far_back():
    docs = PasskeyDocuments(V, 1024, 2048, pairs=12, digits=4)
    v = docs.vocab
    b = next(stream())
    tokens, labels, dist = b.tokens[0], b.labels[0], b.answer_distance[0]
    rows = (dist >= 0).nonzero().flatten()
    assert len(rows) >= 4 * 8  # most pairs found room
    for r in rows.tolist():
        d = int(dist[r])
        source = r + 1 - d  # the label's token, d tokens back
        assert labels[r] == tokens[source] and v.first_digit <= int(labels[r]) < v.first_digit + NUM_DIGITS
        # the segment around the answer: ASK key v1..v4 here, STORE key v1..v4 d tokens back
        i = next(j for j in range(r, r - 6, -1) if tokens[j] == v.ask)
        assert tokens[i - d] == v.store and tokens[i + 1] == tokens[i + 1 - d]
        assert torch.equal(tokens[i + 2:i + 6], tokens[i + 2 - d:i + 6 - d])
    # documents never share answers: the store lies in the same document as the ask
    doc_of = torch.searchsorted(b.cu_seqlens.long(), torch.arange(b.num_tokens), right=True)
    assert all(doc_of[r + 1 - int(dist[r])] == doc_of[r] for r in rows.tolist())
    # non-answer rows are -1, and the filler uses only filler tokens
    assert (dist[dist < 0] == -1).all()
    markers = ((tokens == v.store) | (tokens == v.ask)).nonzero().flatten().tolist()
    inside = {p + i for p in markers for i in range(6)}
    special = ((tokens >= v.filler) & (tokens != v.eod)).nonzero().flatten().tolist()
    assert set(special) <= inside and all(v.first_key <= int(tokens[p + 1]) < v.ask for p in markers if p + 1 < len(tokens))


def test_distances_span_from_a_few_tokens_to_the_document():
    dists = torch.cat([b.answer_distance[b.answer_distance >= 0] for _, b in zip(range(6), stream())])
    assert dists.min() < 64 and dists.max() > 1024  # far past a 16 x 32 = 512-token block budget
    assert (dists > 512).float().mean() > 0.1


def test_deterministic_and_split_over_data_parallel_ranks_like_mock():
    a, b = next(stream(seed=9)), next(stream(seed=9))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answer_distance, b.answer_distance)
    assert not torch.equal(a.tokens, next(stream(seed=10)).tokens)
    whole = [x for _, x in zip(range(4), stream(microbatches_per_step=2))]
    rank1 = [x for _, x in zip(range(2), stream(microbatches_per_step=1, dp_rank=1, dp_size=2))]
    assert torch.equal(rank1[0].tokens, whole[1].tokens) and torch.equal(rank1[1].answer_distance, whole[3].answer_distance)
    assert torch.equal(next(stream(microbatches_per_step=1, start=3)).tokens, whole[3].tokens)


def test_context_parallel_ranks_keep_their_answer_rows():
    b = next(stream())
    parts = [b.split_for_context_parallel(2048, 2, r) for r in range(2)]
    for p in parts:
        assert torch.equal(p.answer_distance, b.answer_distance[:, p.qpos])
    assert sum(int((p.answer_distance >= 0).sum()) for p in parts) == int((b.answer_distance >= 0).sum())


def test_bucket_edges():
    assert evaluation.bucket_edges(256) == [0, 64, 128, 256]
    assert evaluation.bucket_edges(300) == [0, 64, 128, 256, 300]
    assert evaluation.bucket_names([0, 64, 128]) == ["0-64", "64-128"]


@pytest.fixture(scope="module")
def world():
    from msa_megatron.config import load_config
    from msa_megatron.training.distributed import init_distributed, shutdown

    init_distributed(load_config({}))
    yield
    shutdown()


def test_validation_sums_loss_by_position_and_hits_by_distance(world):
    """Hand-made logits: the bucket sums must be the per-token cross entropy and arg-max hits."""
    from msa_megatron.data.batch import pack_samples

    tokens = torch.tensor([3, 4, 5, 6, 7, 8, 9, 1, 2, 3])  # 9 rows, label = next token
    dist = torch.tensor([-1, -1, -1, -1, -1, 70, 70, -1, -1, 3])  # rows 4, 5 and 8 are answers
    b = pack_samples([tokens], eod=99, answer_distances=[dist])
    assert b.answer_distance[0].tolist() == [-1, -1, -1, -1, 70, 70, -1, -1, 3]
    b.position_ids = torch.tensor([[0, 10, 63, 64, 100, 127, 128, 200, 255]])  # buckets 0,0,0,1,1,1,2,2,2
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 9, 16, generator=g)
    logits[0, 4, 8] = 9.0  # row 4 (label 8) is a hit, row 5 (label 9) and row 8 (label 3) misses
    logits[0, 5, 0] = 9.0
    logits[0, 8, 0] = 9.0
    b.loss_mask[0, 2] = 0.0  # a masked row counts nowhere
    edges = [0, 64, 128, 256]
    want = torch.nn.functional.cross_entropy(logits[0].double(), b.labels[0], reduction="none")
    loss_sum, count, report = evaluation.validation_loss_func(b, edges, logits.clone())
    assert int(count) == 8 and float(loss_sum) == pytest.approx(float(want.sum() - want[2]), rel=1e-5)
    rec = evaluation.reduce_buckets([report], edges, True, torch.device("cpu"))
    assert rec["val/lm_loss_by_pos/0-64"] == pytest.approx(float(want[[0, 1]].mean()), rel=1e-6)
    assert rec["val/lm_loss_by_pos/128-256"] == pytest.approx(float(want[[6, 7, 8]].mean()), rel=1e-6)
    assert rec["val/answer_acc/64-128"] == 0.5 and rec["val/answer_count/64-128"] == 2
    assert rec["val/answer_acc/0-64"] == 0.0 and rec["val/answer_count/0-64"] == 1
    assert rec["val/answer_acc"] == pytest.approx(1 / 3)
    assert rec["val/answer_loss/0-64"] == pytest.approx(float(want[8]), rel=1e-6)
    assert "val/answer_acc/128-256" not in rec

    # bf16 logits tie: a label sharing the maximum with two others gets a third of a hit, not a hit
    logits[0, 8, [0, 3, 7]] = 9.0  # row 8's label 3 ties with 0 and 7
    _, _, report = evaluation.validation_loss_func(b, edges, logits.clone())
    rec = evaluation.reduce_buckets([report], edges, True, torch.device("cpu"))
    assert rec["val/answer_acc/0-64"] == pytest.approx(1 / 3) and rec["val/answer_acc"] == pytest.approx((1 + 1 / 3) / 3)


def test_argmax_credit_shares_ties():
    logits = torch.tensor([[1.0, 5.0, 5.0, 2.0], [7.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]]).to(torch.bfloat16)
    labels = torch.tensor([2, 0, 1])
    credit = evaluation.argmax_credit(logits, labels, None)
    assert credit.tolist() == [0.5, 1.0, 0.25]
    assert evaluation.argmax_credit(logits, torch.tensor([3, 1, 0]), None).tolist() == [0.0, 0.0, 0.25]


PASSKEY_RUN = [
    "data=passkey", "data.seq_length=256", "data.mock_min_doc=128", "data.mock_max_doc=256", "data.passkey_pairs=6",
    "train.steps=2", "train.eval_interval=2", "data.valid_microbatches=2", "attention.block_size=16",
    "attention.topk_blocks=2", "attention.index_head_dim=16", "stage.warmup_tokens=512", "model.use_cpu_initialization=true",
    "checkpoint.save=null",
]


@pytest.mark.slow
def test_validation_metrics_under_tensor_parallelism_equal_one_process(tmp_path):
    """TP ranks hold half the vocabulary each: the arg-max and the loss combine over both slices
    and count once (CP ranks' rows: test_context_parallel_ranks_keep_their_answer_rows)."""
    from tests.runs import train

    one = [r for r in train(tmp_path / "one", *PASSKEY_RUN) if "val/lm_loss" in r][-1]
    two = [r for r in train(tmp_path / "two", *PASSKEY_RUN, "parallel.tensor_model_parallel_size=2", nproc=2) if "val/lm_loss" in r][-1]
    assert any(k.startswith("val/answer_acc/") for k in one) and any(k.startswith("val/lm_loss_by_pos/") for k in one)
    assert set(one) == set(two)
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
