"""Dense checkpoints in, MSA checkpoints out: importers, the exporter and their name/shape maps.

- `hf.py`            Hugging Face safetensors (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral, and
                     MiniMax-M3 files written by our exporter) -> our parameter names
- `deepspeed_zero.py` DeepSpeed ZeRO 1-3 checkpoints, consolidated by DeepSpeed's own utility
- `megatron_lm.py`   Megatron-LM checkpoints (torch_dist, legacy per-rank torch files)
- `export.py`        our checkpoint -> Hugging Face (MiniMax-M3 layout, or the dense architectures)
- `hf_config.py`     config.json <-> `model.*` / `attention.*` keys, with one-line refusals
- `hf_names.py`      tensor rules: which Hugging Face tensors make which of our parameters
- `layout.py`        megatron-core tensor layouts (fused qkv, fused gate/up)
- `writer.py`        a megatron-core dist checkpoint + a Hydra recipe the training run uses

Every importer produces global (unsharded) tensors under our parameter names at TP=PP=EP=1; the
writer places them into the sharded state dict of the real model (built on the meta device), so
megatron-core's dist_checkpointing reshards them to any layout at `checkpoint.init_from`.
"""


class ConvertError(ValueError):
    """A source or destination cannot be converted as asked; one line naming the offending value."""
