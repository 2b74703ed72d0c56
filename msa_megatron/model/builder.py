"""Build the model: one function, so that moving from GPTModel to HybridModel stays local."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

from msa_megatron.model.specs import block_spec, transformer_engine_available


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron-LM's rule: pad the vocabulary to a multiple of 128 * TP so it shards evenly."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


def use_transformer_engine(cfg) -> bool:
    impl = cfg.model.transformer_impl
    if impl == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError("model.transformer_impl='transformer_engine' but Transformer Engine is not importable")
    return impl == "transformer_engine" or (impl == "auto" and transformer_engine_available())


def build_model(cfg, tconfig, vp_stage=None) -> GPTModel:
    """The GPT/MoE model of this pipeline stage (virtual stage `vp_stage`), on the current device."""
    tconfig.experimental_attention_variant_loss_scale_func = _kl_loss_scale_func()
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec(cfg, tconfig, use_transformer_engine(cfg), vp_stage=vp_stage),
        vocab_size=padded_vocab_size(cfg.model.vocab_size, cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=cfg.model.rotary_percent,
        rotary_base=cfg.model.rotary_base,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if tconfig.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tconfig, model)
    return model


def _kl_loss_scale_func():
    from msa_megatron.model.kl_loss import KLLossAutoScaler

    return KLLossAutoScaler.set_loss_scale
