"""Training side: megatron GPTDataset/BlendedDataset over data_prep output -> packed micro-batches."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import numpy as np
import pytest
import torch

from data_prep import cli
from data_prep.corpus import train_tokenizer
from msa_megatron.config import ConfigError, load_config
from msa_megatron.data import build_data
from msa_megatron.data.indexed import MicroBatchSampler, build_datasets
from msa_megatron.data.blend import check_blend

pytestmark = pytest.mark.filterwarnings("ignore:Could not determine rank")  # megatron logging without torch.distributed

SEQ = 64


def synthetic_documents(seed: int, count: int) -> list[str]:
    """Documents from a few words to several samples long, so packs mix short and cut documents."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    return [" ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 10, 40, 150]))) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two data_prep datasets (A, B) sharing one tokenizer, plus a tokenizer with another EOD id."""
    root = tmp_path_factory.mktemp("indexed")
    docs_a, docs_b = synthetic_documents(1, 80), synthetic_documents(2, 60)
    train_tokenizer(docs_a + docs_b, 300, root / "tokenizer.json")
    prefixes = {}
    for name, docs in (("a", docs_a), ("b", docs_b)):
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        prefixes[name] = cli.run([str(src), "--tokenizer", str(root / "tokenizer.json"), "--output-prefix", str(root / name), "--workers", "0", "--no-progress"])
    (root / "other").mkdir()
    from tokenizers import Tokenizer, models

    other = Tokenizer(models.BPE())
    other.add_special_tokens(["<pad>", "<|endoftext|>"])  # EOD is id 1 here, 0 in the data
    other.save(str(root / "other" / "tokenizer.json"))
    return {"root": root, "tokenizer": str(root / "tokenizer.json"), **prefixes}


def make_cfg(corpus, **data):
    d = {
        "type": "indexed",
        "seq_length": SEQ,
        "blend": [[1.0, corpus["a"]]],
        "split": "80,20,0",
        "cache_dir": str(corpus["root"] / "index_cache"),
        "tokenizer": corpus["tokenizer"],
        "valid_microbatches": 3,
    }
    d.update(data)
    train = {"micro_batch_size": 2, "global_batch_size": 8, "steps": 30}
    return load_config({"model": {"vocab_size": 320}, "data": d, "train": train})


def take(stream, n):
    return list(itertools.islice(stream, n))


def same(a, b) -> bool:
    return all(torch.equal(x.tokens, y.tokens) and torch.equal(x.cu_seqlens, y.cu_seqlens) for x, y in zip(a, b, strict=True))


def test_packed_micro_batches_follow_document_boundaries(corpus):
    cfg = make_cfg(corpus)
    streams = build_data(cfg, dp_rank=0, dp_size=1)
    eod = streams.eod
    batches = take(streams.train, 12)
    seen_documents = 0
    for b in batches:
        tok, lab, mask, pos, cu = b.tokens[0], b.labels[0], b.loss_mask[0], b.position_ids[0], b.cu_seqlens.tolist()
        assert tok.numel() == cfg.train.micro_batch_size * SEQ and b.cu_seqlens.dtype == torch.int32
        # edges: every sample edge and every position right after an EOD, nothing else
        sample_edges = set(range(0, tok.numel() + 1, SEQ))
        after_eod = {int(i) + 1 for i in torch.nonzero(tok == eod).flatten()}
        assert set(cu) == sample_edges | after_eod and cu == sorted(cu)
        assert b.max_seqlen == max(e - s for s, e in zip(cu, cu[1:]))
        # the loss skips exactly the EOD positions, whose label would be the next document's first token
        assert torch.equal(mask == 0, tok == eod)
        # labels are the next token inside a sample; positions restart at each document
        for s in range(0, tok.numel(), SEQ):
            assert torch.equal(lab[s : s + SEQ - 1], tok[s + 1 : s + SEQ])
        for s, e in zip(cu, cu[1:]):
            assert torch.equal(pos[s:e], torch.arange(e - s))
        seen_documents += int((tok == eod).sum())
    assert seen_documents > 10, "the fixture packs many documents per micro-batch"


def test_no_packing_is_one_sequence_per_sample(corpus):
    packed = take(build_data(make_cfg(corpus), dp_rank=0, dp_size=1).train, 4)
    plain = take(build_data(make_cfg(corpus, pack_documents=False, reset_position_ids=False), dp_rank=0, dp_size=1).train, 4)
    for p, q in zip(packed, plain):
        assert torch.equal(p.tokens, q.tokens), "same samples, only the packing differs"
        assert q.cu_seqlens.tolist() == [0, SEQ, 2 * SEQ] and q.max_seqlen == SEQ
        assert torch.all(q.loss_mask == 1)
        assert torch.equal(q.position_ids[0], torch.arange(SEQ).repeat(2))


def test_positions_without_reset(corpus):
    batches = take(build_data(make_cfg(corpus, reset_position_ids=False), dp_rank=0, dp_size=1).train, 6)
    assert any(len(b.cu_seqlens) > 3 for b in batches), "documents are still delimited"
    assert all(torch.equal(b.position_ids[0], torch.arange(SEQ).repeat(2)) for b in batches)


def test_data_parallel_ranks_split_one_global_stream(corpus):
    cfg = make_cfg(corpus)
    single = take(build_data(cfg, dp_rank=0, dp_size=1).train, 8)
    rank0 = take(build_data(cfg, dp_rank=0, dp_size=2).train, 4)
    rank1 = take(build_data(cfg, dp_rank=1, dp_size=2).train, 4)
    # megatron's interleaving: rank r's micro-batch n is global micro-batch n*dp + r
    assert same(rank0, single[0::2]) and same(rank1, single[1::2])
    assert not any(torch.equal(a.tokens, b.tokens) for a in rank0 for b in rank1)
    indices = [set(MicroBatchSampler(1000, 3, r, 4).indices(n)) for r in range(4) for n in range(5)]
    assert set().union(*indices) == set(range(60)) and sum(map(len, indices)) == 60


def test_resume_continues_the_stream(corpus):
    cfg = make_cfg(corpus)
    fresh = take(build_data(cfg, dp_rank=1, dp_size=2).train, 9)
    resumed = take(build_data(cfg, dp_rank=1, dp_size=2, consumed_microbatches=5).train, 4)
    assert same(resumed, fresh[5:])


def test_validation_stream_is_fixed_and_separate(corpus):
    cfg = make_cfg(corpus)
    streams = build_data(cfg, dp_rank=0, dp_size=1)
    first, second = list(streams.valid()), list(streams.valid())
    assert len(first) == cfg.data.valid_microbatches
    assert same(first, second)
    train_tokens = {tuple(b.tokens[0].tolist()) for b in take(streams.train, 15)}
    assert all(tuple(b.tokens[0].tolist()) not in train_tokens for b in first)


def test_dataloader_workers_give_the_same_batches(corpus):
    inline = take(build_data(make_cfg(corpus), dp_rank=0, dp_size=1).train, 3)
    workers = take(build_data(make_cfg(corpus, num_workers=2), dp_rank=0, dp_size=1).train, 3)
    assert same(inline, workers)


def test_blend_weights_shape_the_mix(corpus):
    cfg = make_cfg(corpus, blend=[[0.75, corpus["a"]], [0.25, corpus["b"]]])
    train, _ = build_datasets(cfg, check_blend(cfg), dp_size=1)
    share = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert abs(share[0] - 0.75) < 0.02 and abs(share[1] - 0.25) < 0.02
    assert next(build_data(cfg, dp_rank=0, dp_size=1).train).tokens.numel() == 2 * SEQ


def copy_prefix(corpus, tmp_path, drop: str = "") -> str:
    prefix = str(tmp_path / "copy_text_document")
    for suffix in (".bin", ".idx", ".manifest.json"):
        if suffix != drop:
            shutil.copy(corpus["a"] + suffix, prefix + suffix)
    return prefix


@pytest.mark.parametrize("drop", [".bin", ".idx", ".manifest.json"])
def test_missing_files_name_the_prefix(corpus, tmp_path, drop):
    prefix = copy_prefix(corpus, tmp_path, drop)
    with pytest.raises(ConfigError, match=rf"^data\.blend\[0\]='{prefix}': missing {prefix}{drop}"):
        build_data(make_cfg(corpus, blend=[[1.0, prefix]]), dp_rank=0, dp_size=1)


def test_vocab_larger_than_model(corpus):
    cfg = make_cfg(corpus)
    cfg.model.vocab_size = 256
    with pytest.raises(ConfigError, match=r"vocab_size=300 > model\.vocab_size=256"):
        build_data(cfg, dp_rank=0, dp_size=1)


def test_eod_mismatch_between_manifest_and_tokenizer(corpus):
    with pytest.raises(ConfigError, match=r"^data\.tokenizer=.*'<\|endoftext\|>' has id 1 there, .* EOD id 0"):
        build_data(make_cfg(corpus, tokenizer=str(corpus["root"] / "other")), dp_rank=0, dp_size=1)


def test_eod_mismatch_inside_the_blend(corpus, tmp_path):
    prefix = copy_prefix(corpus, tmp_path)
    manifest = json.loads(open(prefix + ".manifest.json").read())
    manifest["eod_id"] = 5
    with open(prefix + ".manifest.json", "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ConfigError, match=r"^data\.blend\[1\]=.*EOD id 5 differs"):
        build_data(make_cfg(corpus, blend=[[1, corpus["a"]], [1, prefix]], tokenizer=None), dp_rank=0, dp_size=1)


@pytest.mark.parametrize(
    "blend, match",
    [
        ([], r"^data\.blend=\[\]: is empty"),
        ([[0, "x"]], r"^data\.blend\[0\]\[0\]=0: weight must be a number > 0"),
        ([[1, "x"], [-0.5, "y"]], r"^data\.blend\[1\]\[0\]=-0\.5: weight must be a number > 0"),
        ([["heavy", "x"]], r"^data\.blend\[0\]\[0\]='heavy'"),
        ([["x"]], r"^data\.blend\[0\]=\['x'\]: must be a \[weight, prefix\] pair"),
    ],
)
def test_bad_blend_config(corpus, blend, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(corpus, blend=blend)


def test_split_without_validation_documents(corpus):
    with pytest.raises(ConfigError, match=r"^data\.split='100,0,0': the valid split .* gets no documents"):
        build_data(make_cfg(corpus, split="100,0,0"), dp_rank=0, dp_size=1)


@pytest.mark.parametrize("preset", ["stdlib", "blend_example"])
def test_data_presets_compose_and_validate(monkeypatch, preset):
    from hydra import compose, initialize_config_dir

    from msa_megatron.config import register_hydra_schema
    from tests.paths import CONF_DIR

    monkeypatch.delenv("MSA_CACHE", raising=False)
    register_hydra_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = load_config(compose(config_name="config", overrides=[f"data={preset}", "model.vocab_size=8192"]))
    assert cfg.data.type == "indexed" and cfg.data.blend
    if preset == "stdlib":  # where `python -m data_prep.corpus` writes by default
        assert cfg.data.blend == [[1.0, ".cache/stdlib/stdlib_text_document"]]
        assert cfg.data.tokenizer == ".cache/stdlib/tokenizer.json"
