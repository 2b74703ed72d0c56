"""The MSA layer inside megatron-core (one process, CPU, reference backend)."""

import pytest
import torch

from msa_megatron.config import load_config, to_transformer_config
from msa_megatron.data.mock import mock_batches
from msa_megatron.model.attention import msa_core_attentions, set_sparse_stage
from msa_megatron.model.builder import build_model
from msa_megatron.model.kl_loss import KLLossAutoScaler
from msa_megatron.training.distributed import init_distributed, shutdown

BASE = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 8, "vocab_size": 128},
    "attention": {"block_size": 8, "topk_blocks": 3, "index_head_dim": 8},
    "data": {"seq_length": 96},
}


@pytest.fixture(autouse=True)
def no_moe_aux_gradient():
    """The MoE router's aux loss rides on activations too: silence it so gradients are attributable."""
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([0.0]))
    yield
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([1.0]))


def config(**overrides):
    merged = {k: dict(v) for k, v in BASE.items()}
    for group, values in overrides.items():
        merged.setdefault(group, {}).update(values)
    return load_config(merged)


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    init_distributed(config())
    yield
    shutdown()


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg, to_transformer_config(cfg, use_cpu_initialization=True))


def batch(cfg, min_doc=20, max_doc=90, n=0):
    it = mock_batches(vocab_size=cfg.model.vocab_size, seq_length=cfg.data.seq_length, micro_batch_size=2,
                      min_doc=min_doc, max_doc=max_doc, seed=3, dp_rank=0, start=n)
    return next(it)


def lm_loss(model, b):
    out = model(b.tokens, b.position_ids, None, labels=b.labels, packed_seq_params=b.packed_seq_params())
    return (out * b.loss_mask).sum() / b.loss_mask.sum()


def grads(model):
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def test_msa_and_gqa_differ_exactly_by_indexer_params():
    msa = dict(build(config()).named_parameters())
    gqa = dict(build(config(attention={"type": "gqa"})).named_parameters())
    extra = set(msa) - set(gqa)
    assert extra and all(".self_attention.indexer." in n for n in extra), extra
    assert set(gqa) <= set(msa)
    assert all(msa[n].shape == gqa[n].shape for n in gqa)
    per_layer = sorted(n.split("indexer.")[1] for n in extra if ".layers.0." in n)
    assert per_layer == ["k_norm_weight", "linear_k.weight", "linear_q.weight", "q_norm_weight"]


@pytest.mark.parametrize("sparse", [False, True])
def test_kl_only_backward_reaches_only_the_indexer(sparse):
    cfg = config()
    model = build(cfg)
    set_sparse_stage(model, sparse)
    KLLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    (lm_loss(model, batch(cfg)) * 0.0).backward()  # LM contributes exact zeros; only the KL flows
    g = grads(model)
    for name, grad in g.items():
        if ".indexer." in name:
            assert grad.abs().sum() > 0, name
        else:
            assert torch.count_nonzero(grad) == 0, f"KL gradient leaked into {name}"


@pytest.mark.parametrize("sparse", [False, True])
def test_lm_only_backward_gives_the_indexer_nothing(sparse):
    cfg = config()
    model = build(cfg)
    set_sparse_stage(model, sparse)
    KLLossAutoScaler.set_loss_scale(torch.tensor(0.0))
    try:
        lm_loss(model, batch(cfg)).backward()
    finally:
        KLLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    g = grads(model)
    assert all(torch.count_nonzero(v) == 0 for n, v in g.items() if ".indexer." in n)
    assert g["decoder.layers.0.self_attention.linear_qkv.weight"].abs().sum() > 0


def test_sparse_equals_dense_when_documents_fit_the_budget():
    """Documents of <= k*Bk = 24 tokens: the sparse stage must reproduce dense attention."""
    cfg = config()
    model = build(cfg)
    b = batch(cfg, min_doc=4, max_doc=24)
    assert int((b.cu_seqlens[1:] - b.cu_seqlens[:-1]).max()) <= 24
    set_sparse_stage(model, False)
    dense = lm_loss(model, b)
    set_sparse_stage(model, True)
    sparse = lm_loss(model, b)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    set_sparse_stage(model, True)
    longer = batch(cfg, min_doc=60, max_doc=90)
    a = lm_loss(model, longer)
    set_sparse_stage(model, False)
    assert abs(a.item() - lm_loss(model, longer).item()) > 1e-6  # beyond the budget they differ


@pytest.mark.parametrize("attention", ["msa", "gqa"])
def test_dense_attention_gets_the_hosts_document_edges(attention, monkeypatch):
    """The warm-up and gqa layers hand the batch's host edges to the dense attention (which then
    calls cuDNN per long document on the GPU, no device sync)."""
    from msa_megatron import ops

    seen, dense = [], ops.dense_attention

    def spy(q, k, v, cu, shape, backend, qpos=None):
        seen.append(shape.doc_edges)
        return dense(q, k, v, cu, shape, backend, qpos=qpos)

    monkeypatch.setattr(ops, "dense_attention", spy)
    cfg = config(attention={"type": attention})
    model = build(cfg)
    set_sparse_stage(model, False)
    b = batch(cfg)
    lm_loss(model, b)
    assert len(seen) == cfg.model.num_layers and b.cu_seqlens.numel() > 3
    assert all(edges == tuple(b.cu_seqlens.tolist()) for edges in seen)


def test_kl_is_recorded_per_layer_and_nonnegative():
    cfg = config()
    model = build(cfg)
    lm_loss(model, batch(cfg))
    layers = msa_core_attentions(model)
    assert [m.layer_number for m in layers] == [1, 2]
    for m in layers:
        assert m.stats.count == 1 and m.stats.kl_sum.item() > 0


def test_sparse_kl_value_arrives_with_the_backward(monkeypatch):
    """Sparse-stage training steps take the KL from the attention backward (ops.sparse_attention_with_kl):
    the logged value is unknown (NaN) until the backward ran, then equals the separate ops' value,
    and every gradient equals theirs."""
    from msa_megatron import ops

    cfg = config()
    model = build(cfg)
    set_sparse_stage(model, True)
    b = batch(cfg)
    KLLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    layers = msa_core_attentions(model)
    loss = lm_loss(model, b)
    assert all(m.stats.count == 1 and torch.isnan(m.stats.kl_sum) for m in layers)
    loss.backward()
    in_backward = [m.stats.kl_sum.item() for m in layers]
    grads_in_backward = grads(model)
    for m in layers:
        m.stats.reset()
    for p in model.parameters():
        p.grad = None
    monkeypatch.setattr(ops, "sparse_attention_with_kl", lambda *args, **kwargs: None)
    lm_loss(model, b).backward()
    separate = [m.stats.kl_sum.item() for m in layers]
    assert all(v > 0 for v in separate) and in_backward == pytest.approx(separate, rel=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(grads_in_backward[name], g, rtol=1e-5, atol=1e-8, msg=name)


def test_kl_gradient_is_averaged_over_microbatches():
    """Two identical micro-batches through megatron-core's schedule give the one-micro-batch gradient."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from msa_megatron.training.loop import lm_loss_func

    cfg = config()
    b = batch(cfg)

    def step(data_iterator, model):
        x = next(data_iterator)
        out = model(x.tokens, x.position_ids, None, labels=x.labels, packed_seq_params=x.packed_seq_params())
        return out, partial(lm_loss_func, x.loss_mask)

    result = []
    for n in (1, 2):
        model = build(cfg)
        model.config.experimental_attention_variant_loss_scale_func = KLLossAutoScaler.set_loss_scale
        set_sparse_stage(model, True)
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([b] * n), model=[model],
                                    num_microbatches=n, seq_length=b.num_tokens, micro_batch_size=1)
        result.append(grads(model))
    for name in result[0]:
        torch.testing.assert_close(result[1][name], result[0][name], rtol=1e-5, atol=1e-7, msg=name)
    KLLossAutoScaler.set_loss_scale(torch.tensor(1.0))


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_gradient_is_lambda_times_the_kl_gradient(sparse):
    """KL-only backward == autograd of lambda * sum over layers of the reference KL (value scale included)."""
    from msa_megatron.ops import reference as ref

    lam = 0.3
    cfg = config(attention={"kl": {"coeff": lam}})
    model = build(cfg)
    set_sparse_stage(model, sparse)
    captured = {}
    for i, layer in enumerate(model.decoder.layers):
        attn = layer.self_attention
        attn.indexer.register_forward_hook(lambda m, a, out, i=i: captured.setdefault(i, {}).update(index=out))
        attn.core_attention.register_forward_pre_hook(lambda m, a, kw, i=i: captured.setdefault(i, {}).update(q=a[0], k=a[1]), with_kwargs=True)
    b = batch(cfg)
    KLLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    loss = lm_loss(model, b)
    expected_kl = 0.0
    for parts in captured.values():
        qi, ki = parts["index"]
        topk = ref.msa_indexer(qi.detach(), ki.detach(), b.cu_seqlens, 8, 3)[0] if sparse else None
        expected_kl = expected_kl + ref.indexer_kl(parts["q"], parts["k"], qi, ki, b.cu_seqlens, topk, 8)
    params = {n: p for n, p in model.named_parameters() if ".indexer." in n}
    want = torch.autograd.grad(lam * expected_kl, list(params.values()), retain_graph=True)
    (loss * 0.0).backward()
    for (name, p), w in zip(params.items(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-8, msg=name)


def test_index_projections_come_from_the_layer_spec():
    """The spec decides the indexer's linear layers (so Transformer Engine can swap them)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from msa_megatron.model import specs
    from msa_megatron.model.indexer import ReplicatedLinear

    class MarkedColumnParallel(ColumnParallelLinear):
        pass

    cfg = config()
    spec, _ = specs.layer_spec(cfg, use_te=False, layer=1)
    indexer = spec.submodules.self_attention.submodules.indexer
    assert (indexer.submodules.linear_q, indexer.submodules.linear_k) == (ColumnParallelLinear, ReplicatedLinear)
    original = specs._local_submodules

    def marked(cfg, moe):
        sub, norm, index = original(cfg, moe)
        index.linear_q = MarkedColumnParallel
        return sub, norm, index

    specs._local_submodules = marked
    try:
        model = build(cfg)
    finally:
        specs._local_submodules = original
    layers = model.decoder.layers
    assert all(isinstance(layer.self_attention.indexer.linear_q, MarkedColumnParallel) for layer in layers)
    dense = build(config(attention={"dense_layers": [0]})).decoder.layers
    assert not hasattr(dense[0].self_attention, "indexer") and hasattr(dense[1].self_attention, "indexer")
