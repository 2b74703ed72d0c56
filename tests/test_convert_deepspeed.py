"""DeepSpeed ZeRO 1/2/3 checkpoints written by a real DeepSpeed engine (two gloo ranks) import through
DeepSpeed's own consolidation and compute the source model's logits."""

import os
import shutil

import pytest
import torch

from msa_megatron.convert import ConvertError, writer
from msa_megatron.convert.deepspeed_zero import import_deepspeed
from tests.convert_cases import MSA, assert_logits_close, hf_logits, imported_config, load_ours, our_logits, source_checkpoints, tokens, with_padded_vocab
from tests.test_model import single_process_world  # noqa: F401  (fixture: one-process world)

pytestmark = pytest.mark.slow  # the sources come from a two-rank torchrun


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return source_checkpoints(tmp_path_factory)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_checkpoint_of_hf_modules_computes_the_source_logits(sources, tmp_path, stage):
    from transformers import AutoModelForCausalLM

    result = import_deepspeed(str(sources / f"zero{stage}"), "z", hf_config=str(sources / "hf"))
    assert result.model_type == "qwen3_moe" and not result.dropped
    writer.write(str(tmp_path / "ours"), result, "z")
    source = AutoModelForCausalLM.from_pretrained(str(sources / "hf")).eval()
    seqs = tokens()
    want = hf_logits(source, seqs)
    for attention in ({"type": "gqa", "backend": "reference"}, MSA):
        assert_logits_close(our_logits(load_ours(tmp_path / "ours", imported_config(tmp_path / "ours", attention)), seqs), want)


@pytest.mark.parametrize("names", ["mds", "mds_pipe"])
def test_zero_checkpoint_of_megatron_deepspeed_gpt(sources, tmp_path, names):
    result = import_deepspeed(str(sources / names), "mds")
    writer.write(str(tmp_path / "ours"), result, "mds")
    reference = torch.load(sources / "mds_reference.pt")
    cfg = imported_config(tmp_path / "ours")
    ours = load_ours(tmp_path / "ours", cfg)
    source = load_ours(tmp_path / "ours", cfg)
    source.load_state_dict({**source.state_dict(), **with_padded_vocab(reference, cfg.model.vocab_size)})
    seqs = tokens()
    assert_logits_close(our_logits(ours, seqs), our_logits(source, seqs), atol=0)
    assert_logits_close(our_logits(load_ours(tmp_path / "ours", imported_config(tmp_path / "ours", MSA)), seqs), our_logits(source, seqs))


def test_zero_directory_without_latest_is_one_line(sources, tmp_path):
    shutil.copytree(sources / "zero2", tmp_path / "zero", ignore=shutil.ignore_patterns("latest"))
    with pytest.raises(ConvertError, match=r"no 'latest' file naming the checkpoint tag; pass --tag \(found: global_step1\)") as e:
        import_deepspeed(str(tmp_path / "zero"), "z", hf_config=str(sources / "hf"))
    assert "\n" not in str(e.value)
    result = import_deepspeed(str(tmp_path / "zero"), "z", tag="global_step1", hf_config=str(sources / "hf"))
    assert result.model_type == "qwen3_moe"
    with pytest.raises(ConvertError, match="tag 'global_step9' has no directory"):
        import_deepspeed(str(tmp_path / "zero"), "z", tag="global_step9")
    assert not os.path.exists(tmp_path / "out")
