"""Megatron-LM checkpoints (legacy per-rank files at TP2 x EP2 and PP2, torch_dist at TP2 x EP2) of a
megatron-core GPT MoE import bitwise and compute the source model's logits."""

import os

import pytest
import torch

from msa_megatron.convert import ConvertError, writer
from msa_megatron.convert.megatron_lm import import_megatron
from tests.convert_cases import MSA, assert_logits_close, imported_config, load_ours, our_logits, source_checkpoints, tokens, with_padded_vocab
from tests.test_model import single_process_world  # noqa: F401  (fixture: one-process world)

pytestmark = pytest.mark.slow  # the sources come from a two-rank torchrun


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return source_checkpoints(tmp_path_factory)


@pytest.mark.parametrize("layout", ["megatron_legacy_tp2ep2", "megatron_legacy_pp2", "megatron_dist_tp2ep2"])
def test_megatron_lm_checkpoint_imports_the_source_model(sources, tmp_path, layout):
    reference = torch.load(sources / "megatron_reference.pt")
    result = import_megatron(str(sources / layout), "mlm")
    assert sorted(result.params) == sorted(reference)
    for name, t in reference.items():
        assert torch.equal(result.params[name][: t.shape[0]], t), name  # vocabulary rows are padded with zeros
    writer.write(str(tmp_path / "ours"), result, "mlm")
    cfg = imported_config(tmp_path / "ours")
    source = load_ours(tmp_path / "ours", cfg)
    source.load_state_dict({**source.state_dict(), **with_padded_vocab(reference, cfg.model.vocab_size)})
    seqs = tokens()
    want = our_logits(source, seqs)
    for attention in ({"type": "gqa", "backend": "reference"}, MSA):
        assert_logits_close(our_logits(load_ours(tmp_path / "ours", imported_config(tmp_path / "ours", attention)), seqs), want)


def test_megatron_errors_are_one_line(sources, tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConvertError, match="neither a torch_dist checkpoint"):
        import_megatron(str(tmp_path / "empty"), "m")
    (tmp_path / "empty" / "latest_checkpointed_iteration.txt").write_text("20")
    with pytest.raises(ConvertError, match="names iteration 20, but .*iter_0000020 does not exist"):
        import_megatron(str(tmp_path / "empty"), "m")
