"""Hugging Face import / export: logits of the converted models equal the source's, round trips are
bitwise, MiniMax-M3's layout loads in transformers and selects the same blocks, bad inputs are one line."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from msa_megatron.convert import ConvertError, writer
from msa_megatron.convert.export import export_hf
from msa_megatron.convert.hf import import_hf
from msa_megatron.model.attention import set_sparse_stage
from tests.convert_cases import (
    MSA,
    VOCAB,
    assert_logits_close,
    hf_logits,
    imported_config,
    load_ours,
    our_logits,
    save_hf,
    tokens,
)
from tests.test_model import single_process_world  # noqa: F401  (fixture: one-process world)


def _import(src, out, **kwargs):
    result = import_hf(str(src), os.path.basename(str(out)), **kwargs)
    return writer.write(str(out), result, os.path.basename(str(out)))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_imported_model_computes_the_source_logits(tmp_path, kind):
    """Dense GQA and the MSA model in its warmup stage both equal the source within 1e-4 (fp32)."""
    source = save_hf(kind, tmp_path / "hf")
    summary = _import(tmp_path / "hf", tmp_path / "ours")
    assert summary["mapped_source_tensors"] == len(load_file(tmp_path / "hf" / "model.safetensors")) and not summary["dropped"]
    seqs = tokens()
    want = hf_logits(source, seqs)
    for attention in ({"type": "gqa", "backend": "reference"}, MSA):
        cfg = imported_config(tmp_path / "ours", attention)
        assert_logits_close(our_logits(load_ours(tmp_path / "ours", cfg), seqs), want)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3_moe", "mixtral"])
def test_export_of_import_is_bitwise_the_source(tmp_path, kind):
    source = save_hf(kind, tmp_path / "hf")
    _import(tmp_path / "hf", tmp_path / "ours")
    export_hf(str(tmp_path / "ours"), str(tmp_path / "back"), arch=kind)
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()  # its config.json too
    seqs = tokens()
    assert_logits_close(hf_logits(reloaded, seqs), hf_logits(source, seqs), atol=0)


def _msa_checkpoint(tmp_path):
    """An MSA checkpoint of ours (index branch trained-like: random weights, norms != 1; layer 0 dense)."""
    save_hf("qwen3_moe", tmp_path / "hf", num_hidden_layers=3, mlp_only_layers=[0])
    result = import_hf(str(tmp_path / "hf"), "m")
    from msa_megatron.config import load_config
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(OmegaConf.structured(result.cfg.model))
    # partial RoPE (4 of 8 dims), as MiniMax-M3 has: the weights do not depend on it, the comparison does
    result.cfg = load_config({"model": {**model, "rotary_percent": 0.5}, "attention": {**MSA, "dense_layers": [0]}})
    g = torch.Generator().manual_seed(5)
    for layer in (1, 2):
        prefix = f"decoder.layers.{layer}.self_attention.indexer."
        result.params[prefix + "linear_q.weight"] = 0.2 * torch.randn(2 * 16, 32, generator=g)
        result.params[prefix + "linear_k.weight"] = 0.2 * torch.randn(16, 32, generator=g)
        for norm in ("q_norm_weight", "k_norm_weight"):
            result.params[prefix + norm] = (1 + 0.2 * torch.randn(16, generator=g)).clamp(0.5, 2.0)
    writer.write(str(tmp_path / "msa"), result, "msa")
    return result


def test_minimax_m3_layout_round_trip_and_transformers_load(tmp_path):
    msa = _msa_checkpoint(tmp_path)
    summary = export_hf(str(tmp_path / "msa"), str(tmp_path / "m3"))
    config = json.load(open(tmp_path / "m3" / "config.json"))
    sparse = config["text_config"]["sparse_attention_config"]
    assert sparse["sparse_attention_freq"] == [0, 1, 1] and sparse["sparse_num_index_heads"] == 2
    assert (sparse["sparse_block_size"], sparse["sparse_topk_blocks"], sparse["sparse_index_dim"]) == (8, 3, 16)
    assert sparse["sparse_score_type"] == "max" and sparse["sparse_local_block"] == 1
    files = load_file(tmp_path / "m3" / "model.safetensors")
    assert summary["written_tensors"] == len(files)
    bias = files["language_model.model.layers.1.block_sparse_moe.e_score_correction_bias"]
    assert bias.shape == (4,) and not bias.any()  # our router has no correction bias: zeros change nothing
    norm = files["language_model.model.layers.1.self_attn.index_q_norm.weight"]
    assert torch.equal(norm, msa.params["decoder.layers.1.self_attention.indexer.q_norm_weight"] - 1)  # Gemma x*(1+w)
    assert "language_model.model.layers.0.self_attn.index_q_proj.weight" not in files  # dense layer: no index branch

    # import(export(msa)) restores every tensor, the index branch included, bitwise
    back = import_hf(str(tmp_path / "m3"), "back")
    assert back.attention["dense_layers"] == [0] and back.attention["type"] == "msa"
    assert sorted(back.params) == sorted(msa.params)
    for name, t in msa.params.items():
        assert torch.equal(back.params[name], t), name

    _transformers_computes_our_attention(tmp_path, config)


def _transformers_computes_our_attention(tmp_path, config):
    """transformers' MiniMax-M3 loads every exported tensor under its own names (conversion mapping); its
    indexer picks the same blocks as ours for each (query, KV group) of a 40-token document, and its
    attention (Gemma q/k norms, partial RoPE) equals ours: dense on layer 0, block-sparse on layer 1."""
    from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig

    from msa_megatron.ops import reference

    config["vision_config"] = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
    hf_cfg = MiniMaxM3VLConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model, info = MiniMaxM3SparseForConditionalGeneration.from_pretrained(str(tmp_path / "m3"), config=hf_cfg, output_loading_info=True)
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert all(k.startswith(("model.visual", "model.vision", "model.multi_modal")) for k in info["missing_keys"]), info["missing_keys"]

    ours = load_ours(tmp_path / "msa", imported_config(tmp_path / "msa", {**MSA, "dense_layers": [0]}, rotary_percent=0.5))
    set_sparse_stage(ours, True)
    captured = {}
    for i in (0, 1):
        attention = ours.decoder.layers[i].self_attention
        attention.register_forward_pre_hook(lambda m, args, kw, i=i: captured.update({f"x{i}": args[0].clone()}), with_kwargs=True)
        attention.register_forward_hook(lambda m, args, out, i=i: captured.update({f"out{i}": out[0].clone()}))  # cloned: the layer adds the residual in place
    ours.decoder.layers[1].self_attention.indexer.register_forward_hook(lambda m, args, out: captured.update(qk=out))
    doc = tokens()[1]
    our_logits(ours, [doc])
    qi, ki = captured["qk"]
    cu = torch.tensor([0, len(doc)], dtype=torch.int32)
    our_topk = reference.msa_indexer(qi, ki, cu, MSA["block_size"], MSA["topk_blocks"])[0]  # [G, T, k]

    text = model.model.language_model
    x = captured["x1"].transpose(0, 1)  # [1, T, h]: the normalised layer input both indexers read
    positions = torch.arange(len(doc))[None]
    with torch.no_grad():
        rope = text.rotary_emb(x, positions)
        hf_topk = text.layers[1].self_attn.indexer(x, rope, None, positions)[0]  # [G, T, k]
        for i in (0, 1):
            out, _ = text.layers[i].self_attn(captured[f"x{i}"].transpose(0, 1), rope, None, position_ids=positions)
            torch.testing.assert_close(out[0], captured[f"out{i}"][:, 0], rtol=0, atol=1e-5, msg=f"attention of layer {i}")
    for g in range(hf_topk.shape[0]):
        for i in range(len(doc)):
            want = {int(b) for b in our_topk[g, i] if b >= 0}
            got = {int(b) for b in hf_topk[g, i] if b >= 0}
            assert got == want, (g, i, got, want)


def _expect_error(match, fn, out):
    with pytest.raises(ConvertError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    assert not os.path.exists(out)


def test_bad_sources_are_one_line_and_write_nothing(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    save_hf("qwen3", src)
    config = json.load(open(src / "config.json"))

    def with_config(**changes):
        json.dump({**config, **changes}, open(src / "config.json", "w"))
        return lambda: _import(src, out)

    _expect_error(r"model_type='gpt2': not an importable architecture", with_config(model_type="gpt2"), out)
    _expect_error(r"intermediate_size=.*|mlp.gate_proj.weight has shape \(48, 32\), the config implies \(64, 32\)", with_config(intermediate_size=64), out)
    _expect_error(r"sliding_window=64: sliding-window attention is not supported", with_config(use_sliding_window=True, sliding_window=64), out)
    _expect_error(r"attention_bias=True: attention biases are not supported", with_config(attention_bias=True), out)
    _expect_error(r"rope_type='yarn': RoPE scaling is not supported", with_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), out)
    with_config()
    os.makedirs(out / "keep")
    _expect_error(r"already exists and is not empty", lambda: _import(src, out), out / "x")
    assert os.listdir(out) == ["keep"]
    os.rmdir(out / "keep"), os.rmdir(out)
    _expect_error(rf"--vocab-size=400: larger than the model's vocabulary \({VOCAB} embedding rows\)", lambda: _import(src, out, vocab_size=400), out)

    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _expect_error(r"1 tensors missing, e.g. model.layers.1.self_attn.k_norm.weight", lambda: _import(src, out), out)

    size = os.path.getsize(src / "model.safetensors")
    os.truncate(src / "model.safetensors", size - 64)
    _expect_error(r"model.safetensors: not a readable safetensors file \(.*\)", lambda: _import(src, out), out)

    _expect_error(r"no such directory", lambda: _import(tmp_path / "nothing", out), out)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no partial output left behind


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    save_hf("qwen3", tmp_path / "hf")
    vocab = {f"t{i}": i for i in range(VOCAB + 5)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "hf" / "tokenizer.json"))
    _expect_error(rf"tokenizer.json: {VOCAB + 5} tokens, larger than the model's vocabulary \({VOCAB} embedding rows\)",
                  lambda: _import(tmp_path / "hf", tmp_path / "out"), tmp_path / "out")


def test_m3_files_not_written_by_us_are_refused(tmp_path):
    os.makedirs(tmp_path / "m3")
    json.dump({"model_type": "minimax_m3_vl", "text_config": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                                               "vocab_size": 8, "rope_parameters": {"rope_theta": 1e4}}},
              open(tmp_path / "m3" / "config.json", "w"))
    _expect_error("clamped SwiGLU-OAI MLPs and sigmoid routing", lambda: _import(tmp_path / "m3", tmp_path / "out"), tmp_path / "out")


def test_llama_cannot_export_to_minimax_m3(tmp_path):
    save_hf("llama", tmp_path / "hf")
    _import(tmp_path / "hf", tmp_path / "ours")
    _expect_error("model.qk_layernorm=False: MiniMax-M3 always normalises q and k", lambda: export_hf(str(tmp_path / "ours"), str(tmp_path / "m3")), tmp_path / "m3")


def test_sharded_safetensors_round_trip(tmp_path):
    """Exports above the shard size are split with an index json, which the importer reads back."""
    save_hf("qwen3", tmp_path / "hf")
    first = import_hf(str(tmp_path / "hf"), "a")
    writer.write(str(tmp_path / "ours"), first, "a")
    export_hf(str(tmp_path / "ours"), str(tmp_path / "sharded"), arch="qwen3", shard_bytes=20_000)
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    again = import_hf(str(tmp_path / "sharded"), "b")
    assert sorted(again.params) == sorted(first.params)
    assert all(torch.equal(again.params[n], t) for n, t in first.params.items())
