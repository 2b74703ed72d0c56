"""Shared pieces of the conversion tests: tiny random source models built with the real libraries,
and logits of our model loaded through `checkpoint.init_from`'s code path."""

from __future__ import annotations

import json
import os

import torch

from tests.paths import ROOT, readme_section_commands

VOCAB = 300
SEQ_LENGTHS = (19, 40, 7)  # documents of one packed batch
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=512)
KINDS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}
# MSA settings small enough that 40-token documents go sparse (block 8, 3 blocks kept).
MSA = {"type": "msa", "backend": "reference", "block_size": 8, "topk_blocks": 3, "index_head_dim": 16}


def randomize_(model, seed: int) -> None:
    """Every weight random, norms near 1 and biases non-zero, so a mis-mapped tensor shows in logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def hf_model(kind: str, seed: int = 0, **overrides):
    import transformers

    config_cls, model_cls, extra = KINDS[kind]
    config = getattr(transformers, config_cls)(**{**SHAPE, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    randomize_(model, seed)
    return model


def save_hf(kind: str, path, seed: int = 0, **overrides):
    model = hf_model(kind, seed, **overrides)
    model.save_pretrained(str(path))
    return model


def tokens(seed: int = 7) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in SEQ_LENGTHS]


@torch.no_grad()
def hf_logits(model, seqs) -> list:
    return [model(s[None]).logits[0].float() for s in seqs]


def imported_config(ckpt, attention=None, **model_overrides):
    """The run config of an imported checkpoint (its convert_meta.json), with the attention asked for."""
    from msa_megatron.config import load_config

    with open(os.path.join(ckpt, "convert_meta.json")) as f:
        model = json.load(f)["config"]["model"]
    return load_config({"model": {**model, **model_overrides}, "attention": attention or {"type": "gqa", "backend": "reference"}})


def load_ours(ckpt, cfg):
    """Our model for cfg with weights from ckpt, loaded as checkpoint.init_from loads them (warmup stage)."""
    from msa_megatron.config import to_transformer_config
    from msa_megatron.model.attention import set_sparse_stage
    from msa_megatron.model.builder import build_model
    from msa_megatron.training import checkpoint

    torch.manual_seed(0)
    model = build_model(cfg, to_transformer_config(cfg, use_cpu_initialization=True)).eval()
    checkpoint.init_weights(model, str(ckpt), cfg.checkpoint.init_allow_missing)
    set_sparse_stage(model, False)
    return model


def packed(seqs):
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [len(s) for s in seqs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return torch.cat(seqs)[None], positions, params


@torch.no_grad()
def our_logits(model, seqs) -> list:
    toks, positions, params = packed(seqs)
    out = model(toks, positions, None, packed_seq_params=params)[0]
    return list(torch.split(out[:, :VOCAB].float(), [len(s) for s in seqs]))


def with_padded_vocab(weights: dict, rows: int) -> dict:
    """Our parameters of a source model, its embedding / output rows padded with zeros as the importers do."""
    out = dict(weights)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in out:
            t = out[name]
            out[name] = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return out


def assert_logits_close(ours, theirs, atol=1e-4):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = (a - b).abs().max().item()
        assert err <= atol, f"document {i}: max |logit difference| {err:.3g} > {atol}"


def readme_commands(keyword: str) -> list:
    """The commands of the README's converter sections (tools/convert.py) that contain keyword."""
    section = "### From Hugging Face, DeepSpeed ZeRO and Megatron-LM checkpoints"
    return [c for c in readme_section_commands(section) if keyword in c]


def source_checkpoints(tmp_path_factory):
    """The DeepSpeed and Megatron-LM sources of tests/convert_fixtures.py, made once per test session."""
    import subprocess
    import sys

    from tests.runs import _free_port

    root = tmp_path_factory.getbasetemp() / "convert_sources"
    if not (root / "complete").exists():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "tests.convert_fixtures", str(root)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        (root / "complete").write_text("")
    return root


def run_convert(*args, timeout=300):
    """tools/convert.py as a user runs it: (exit code, stdout, stderr)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout, proc.stderr
