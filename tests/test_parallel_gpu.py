"""On 4 GPUs (NCCL + Triton): parallel layouts track one GPU within bf16 noise, and a 64K-token
document under context parallelism. Results go to $OUT/parallel_gpu.json when $OUT is set."""

import json
import os

import pytest
import torch

from tests.runs import train

pytestmark = pytest.mark.gpu

MODEL = [
    "train.precision=bf16", "parallel.distributed_backend=nccl", "attention.backend=triton",
    "model.num_layers=4", "attention.dense_layers=[0]", "model.moe_layer_freq=[0,1,1,1]",
    "model.hidden_size=256", "model.num_attention_heads=8", "model.num_query_groups=2", "model.kv_channels=64",
    "model.moe_ffn_hidden_size=256", "attention.block_size=32", "attention.topk_blocks=4", "attention.index_head_dim=64",
    "data.seq_length=2048", "data.mock_min_doc=64", "data.mock_max_doc=4096",
]
# 4 micro-batches of 2048 tokens per step (EP 4 leaves 4 data-parallel ranks); steps 1-6 dense.
TRAIN = MODEL + ["train.steps=20", "train.global_batch_size=4", "stage.warmup_tokens=49152", "optim.lr_warmup_steps=3",
                 "checkpoint.save=null"]
LAYOUTS = {  # name -> (GPUs, overrides)
    "tp2xcp2": (4, ["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2"]),
    "cp2": (2, ["parallel.context_parallel_size=2"]),
    "ep4": (4, ["parallel.expert_model_parallel_size=4"]),
    "pp2xtp2": (4, ["parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"]),
}
RESULTS = {}


def _save(name, value):
    RESULTS[name] = value
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "parallel_gpu.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


def _rel(a, b):
    return abs(b - a) / max(abs(a), 1e-12)


def _compare(name, one, other):
    """Per-step rows and the largest relative KL and grad-norm deviations from one GPU."""
    rows = [(a["train/step"], a["train/lm_loss"], b["train/lm_loss"], a["train/kl_loss"], b["train/kl_loss"],
             a["train/grad_norm"], b["train/grad_norm"]) for a, b in zip(one, other)]
    worst = {"kl": max(_rel(r[3], r[4]) for r in rows), "grad_norm": max(_rel(r[5], r[6]) for r in rows),
             "lm": max(_rel(r[1], r[2]) for r in rows)}
    _save(name, {"step, lm 1gpu, lm layout, kl 1gpu, kl layout, gnorm 1gpu, gnorm layout": rows, "max relative deviation": worst})
    for step, lm_a, lm_b, kl_a, kl_b, g_a, g_b in rows:
        print(name, step, f"lm {lm_a:.4f} {lm_b:.4f}  kl {kl_a:.4f} {kl_b:.4f}  gnorm {g_a:.3f} {g_b:.3f}")
    return rows, worst


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    init = tmp_path_factory.mktemp("init")
    train(init, *MODEL, "train.steps=1", "optim.lr_warmup_steps=0")
    weights = f"checkpoint.init_from={init / 'checkpoints'}"
    records = train(tmp_path_factory.mktemp("one"), *TRAIN, weights)
    assert [r["msa/stage_name"] for r in records] == ["dense"] * 6 + ["sparse"] * 14
    return weights, records


@pytest.fixture(scope="module")
def noise_floor(one_gpu, tmp_path_factory):
    """Data parallel 4 computes the same sums as one GPU in another order: how far bf16 rounding alone
    carries a run from one GPU in 20 steps (top-k selection turns small differences into block flips)."""
    weights, one = one_gpu
    dp4 = train(tmp_path_factory.mktemp("dp4"), *TRAIN, weights, nproc=4)
    _, worst = _compare("dp4 (noise floor)", one, dp4)
    return worst


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs")
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_tracks_one_gpu(name, one_gpu, noise_floor, tmp_path):
    weights, one = one_gpu
    gpus, layout = LAYOUTS[name]
    rows, worst = _compare(name, one, train(tmp_path, *TRAIN, weights, *layout, nproc=gpus))
    for step, lm_a, lm_b, *_ in rows:
        assert lm_b == pytest.approx(lm_a, rel=2e-2), (name, step)
    # KL and grad norm react to selection flips: within 10% or three times the noise floor's worst step
    for key in ("kl", "grad_norm"):
        assert worst[key] <= max(0.1, 3 * noise_floor[key]), (name, key, worst[key], noise_floor[key])


LONG = [
    "train.precision=bf16", "parallel.distributed_backend=nccl", "attention.backend=triton",
    "model.num_layers=2", "model.hidden_size=1024", "model.num_attention_heads=16", "model.num_query_groups=4",
    "model.kv_channels=128", "model.moe_ffn_hidden_size=1024", "model.max_position_embeddings=65536",
    "model.use_cpu_initialization=true", "attention.block_size=128", "attention.topk_blocks=16",
    "attention.index_head_dim=128", "data.seq_length=65536", "data.mock_min_doc=70000", "data.mock_max_doc=70000",
    "train.global_batch_size=1", "train.steps=3", "stage.warmup_tokens=65536", "optim.lr_warmup_steps=0",
    "checkpoint.save=null",
]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_64k_document_context_parallel(tmp_path):
    """One 64K-token document: CP 2 computes what CP 1 does (dense step 1, sparse steps 2-3) with
    less memory per GPU."""
    cp1 = train(tmp_path / "cp1", *LONG)
    cp2 = train(tmp_path / "cp2", *LONG, "parallel.context_parallel_size=2", nproc=2)
    rows = [(a["train/step"], a["msa/stage_name"], a["train/lm_loss"], b["train/lm_loss"], a["train/kl_loss"], b["train/kl_loss"],
             a["mem/max_allocated_gb"], b["mem/max_allocated_gb"], a["train/step_time_s"], b["train/step_time_s"]) for a, b in zip(cp1, cp2)]
    _save("64k_cp1_vs_cp2", {"step, stage, lm cp1, lm cp2, kl cp1, kl cp2, peak GiB cp1, peak GiB cp2 (per GPU), s/step cp1, cp2": rows})
    for row in rows:
        print("64k", row)
    assert [r[1] for r in rows] == ["dense", "sparse", "sparse"]
    for _, _, lm1, lm2, kl1, kl2, mem1, mem2, *_ in rows:
        assert lm2 == pytest.approx(lm1, rel=2e-2) and kl2 == pytest.approx(kl1, rel=0.1, abs=5e-3)
        assert mem2 < mem1
