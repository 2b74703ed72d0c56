"""Source checkpoints written by the real libraries, two gloo ranks on the CPU (run under torchrun):

    python -m torch.distributed.run --nproc_per_node 2 -m tests.convert_fixtures OUT

OUT/hf                    a tiny Qwen3-MoE (transformers save_pretrained): the DeepSpeed runs' weights
OUT/zero{1,2,3}           DeepSpeed ZeRO checkpoints of it (a DeepSpeed engine, one optimizer step at lr 0)
OUT/mds, OUT/mds_pipe      ZeRO-2 checkpoints of modules with Megatron-DeepSpeed's GPTModel / GPTModelPipe names, + args
OUT/mds_reference.pt      that module's weights under our names (the logits reference)
OUT/megatron_reference.pt a megatron-core GPT MoE (our names): the Megatron-LM checkpoints' weights
OUT/megatron_{legacy_tp2ep2,legacy_pp2,dist_tp2ep2}
                          Megatron-LM layouts of it: per-rank model_optim_rng.pt files at TP2 x EP2
                          and at PP2, and torch_dist (megatron-core dist_checkpointing + args) at TP2 x EP2
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

MEGATRON_MODEL = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 8,
                  "ffn_hidden_size": 48, "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 16,
                  "moe_layer_freq": [0, 1], "vocab_size": 256, "rotary_base": 10000, "layernorm_epsilon": 1e-5,
                  "moe_token_dispatcher_type": "allgather"}


def megatron_args(cfg, tp=1, pp=1, ep=1):
    """The `args` Megatron-LM saves with a checkpoint (the fields its model shape comes from)."""
    m = cfg.model
    return argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, group_query_attention=True, num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels, max_position_embeddings=m.max_position_embeddings, padded_vocab_size=m.vocab_size,
        normalization="RMSNorm", norm_epsilon=m.layernorm_epsilon, swiglu=True, position_embedding_type="rope",
        rotary_base=m.rotary_base, rotary_percent=1.0, untie_embeddings_and_output_weights=True, add_bias_linear=False,
        add_qkv_bias=False, qk_layernorm=False, num_experts=m.num_moe_experts, moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size, moe_layer_freq=m.moe_layer_freq, moe_aux_loss_coeff=0.01,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1 if ep > 1 else tp,
    )


def _layout(tp=1, pp=1, ep=1):
    from megatron.core import parallel_state as ps

    from msa_megatron.config import load_config
    from msa_megatron.training.distributed import init_distributed

    cfg = load_config({"model": MEGATRON_MODEL, "attention": {"type": "gqa"},
                       "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                    "expert_model_parallel_size": ep, "expert_tensor_parallel_size": 1 if ep > 1 else None}})
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(cfg)
    return cfg


def _build(cfg, seed=0):
    from msa_megatron.config import to_transformer_config
    from msa_megatron.model.builder import build_model

    torch.manual_seed(seed)
    return build_model(cfg, to_transformer_config(cfg, use_cpu_initialization=True))


def megatron_checkpoints(out: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    cfg = _layout()
    reference = _build(cfg)
    if rank == 0:
        torch.save({k: v for k, v in reference.state_dict().items() if not k.endswith("_extra_state")}, os.path.join(out, "megatron_reference.pt"))
    ref_dir = os.path.join(out, "megatron_reference_dist")
    os.makedirs(ref_dir, exist_ok=True)
    dist_checkpointing.save({"model": reference.sharded_state_dict()}, ref_dir)
    for name, (tp, pp, ep) in (("tp2ep2", (2, 1, 2)), ("pp2", (1, 2, 1))):
        cfg = _layout(tp, pp, ep)
        model = _build(cfg, seed=1)  # other weights, replaced by the reference's (resharded by megatron-core)
        model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, ref_dir)["model"])
        args = megatron_args(cfg, tp, pp, ep)
        legacy = os.path.join(out, f"megatron_legacy_{name}")
        rank_dir = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
        if pp > 1:
            rank_dir += f"_{ps.get_pipeline_model_parallel_rank():03d}"
        if ep > 1:
            rank_dir += f"_{ps.get_expert_model_parallel_rank():03d}"
        path = os.path.join(legacy, "iter_0000010", rank_dir)
        os.makedirs(path, exist_ok=True)
        torch.save({"args": args, "iteration": 10, "checkpoint_version": 3.0, "model": model.state_dict_for_save_checkpoint()},
                   os.path.join(path, "model_optim_rng.pt"))
        if rank == 0:
            with open(os.path.join(legacy, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("10")
        if name == "tp2ep2":
            torch_dist = os.path.join(out, "megatron_dist_tp2ep2")
            iteration = os.path.join(torch_dist, "iter_0000010")
            os.makedirs(iteration, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "iteration": 10, "checkpoint_version": 3.0}, iteration)
            if rank == 0:
                with open(os.path.join(torch_dist, "latest_checkpointed_iteration.txt"), "w") as f:
                    f.write("10")
    dist.barrier()
    ps.destroy_model_parallel()


def _deepspeed_engine(model, stage: int):
    import deepspeed

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # a real step that leaves the weights as they are
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


class _Named(torch.nn.Module):
    """Parameters under arbitrary dotted names (nested empty modules), for a foreign layout's names."""

    def __init__(self, tensors: dict):
        super().__init__()
        for name, t in tensors.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(t.clone()))

    def forward(self, x):
        return sum((p.float() * x).sum() for p in self.parameters())


MDS_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
}


def _mds_name(ours: str, layers: int, pipe: bool) -> str:
    """Megatron-DeepSpeed's GPTModel names, or GPTModelPipe's (stage 1 embedding, layers from 2, then norm, head)."""
    if pipe:
        top = {"embedding.word_embeddings.weight": "1.word_embeddings.weight",
               "decoder.final_layernorm.weight": f"{layers + 2}.weight", "output_layer.weight": f"{layers + 3}.lm_head.weight"}
    else:
        top = {"embedding.word_embeddings.weight": "language_model.embedding.word_embeddings.weight",
               "decoder.final_layernorm.weight": "language_model.encoder.final_layernorm.weight",
               "output_layer.weight": "language_model.output_layer.weight"}
    if ours in top:
        return top[ours]
    _, _, layer, rest = ours.split(".", 3)
    return f"{int(layer) + 2}.{MDS_NAMES[rest]}" if pipe else f"language_model.encoder.layers.{layer}.{MDS_NAMES[rest]}"


def deepspeed_checkpoints(out: str) -> None:
    import deepspeed
    import deepspeed.comm.torch as ds_torch

    from tests.convert_cases import hf_model, tokens

    ds_torch.build_shm_op = lambda: None  # DeepSpeed's CPU shared-memory allreduce is a C++ build; gloo suffices
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    x = tokens()[1][None]
    for stage in (1, 2, 3):
        model = hf_model("qwen3_moe", seed=0)  # the same weights on both ranks
        if rank == 0 and stage == 1:
            model.save_pretrained(os.path.join(out, "hf"))
        engine = _deepspeed_engine(model, stage)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        engine.save_checkpoint(os.path.join(out, f"zero{stage}"))

    # Megatron-DeepSpeed GPT names over the weights of one of our dense models
    from msa_megatron.config import load_config

    dense = {**MEGATRON_MODEL, "num_moe_experts": None, "moe_ffn_hidden_size": None, "moe_layer_freq": 1}
    cfg = load_config({"model": dense, "attention": {"type": "gqa"}})
    _layout()
    weights = {k: v for k, v in _build(cfg).state_dict().items() if not k.endswith("_extra_state")}
    if rank == 0:
        torch.save(weights, os.path.join(out, "mds_reference.pt"))
    m = cfg.model
    args = argparse.Namespace(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                              num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                              kv_channels=m.kv_channels, padded_vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
                              swiglu=True, normalization="rmsnorm", layernorm_epsilon=m.layernorm_epsilon,
                              use_rotary_position_embeddings=True, rope_theta=m.rotary_base, add_bias_linear=False,
                              untie_embeddings_and_output_weights=True, num_experts=[1])
    for directory, pipe in (("mds", False), ("mds_pipe", True)):
        engine = _deepspeed_engine(_Named({_mds_name(k, m.num_layers, pipe): v for k, v in weights.items()}), 2)
        engine.backward(engine(torch.ones(())))
        engine.step()
        engine.save_checkpoint(os.path.join(out, directory), client_state={"args": args, "iteration": 1})


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    deepspeed_checkpoints(out)
    megatron_checkpoints(out)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
