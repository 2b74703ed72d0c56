"""Every parallel layout trains exactly like one process started from the same weights (CPU, gloo).

A 4-layer tiny MoE (layers 0-1 keep full attention, layer 0 a dense FFN) trains 4 steps: steps
1-2 in the dense warmup, 3-4 sparse. Every layout starts from the same weights (a 1-step
checkpoint loaded with checkpoint.init_from, so TP/EP/PP initialisation does not matter) and must
match the one-process run in LM loss, mean KL, every per-layer KL and grad norm to 1e-5 (fp32).
Documents of up to 300 tokens cross the context-parallel chunk edges (64 tokens) and exceed the
block budget topk*block = 48 tokens, so the sparse selection is real.
"""

import pytest

from tests.runs import train

MODEL = [
    "model.num_layers=4",
    "attention.dense_layers=[0,1]",
    "model.moe_layer_freq=[0,1,1,1]",
    "attention.block_size=16",
    "attention.topk_blocks=3",
]
COMMON = MODEL + [
    "train.steps=4",
    "train.global_batch_size=2",
    "data.seq_length=256",
    "data.mock_min_doc=40",
    "data.mock_max_doc=300",
    "optim.lr_warmup_steps=1",
    "stage.warmup_tokens=1024",
    "checkpoint.save=null",
]
KEYS = ("train/lm_loss", "train/kl_loss", "train/grad_norm", "msa/kl_loss/layer_03", "msa/kl_loss/layer_04")


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    train(out, *MODEL, "train.steps=1", "optim.lr_warmup_steps=0", "data.seq_length=256")
    return str(out / "checkpoints")


@pytest.fixture(scope="module")
def single_process(initial_weights, tmp_path_factory):
    records = train(tmp_path_factory.mktemp("one"), *COMMON, f"checkpoint.init_from={initial_weights}")
    assert [r["msa/stage_name"] for r in records] == ["dense", "dense", "sparse", "sparse"]
    assert "msa/kl_loss/layer_01" not in records[0]  # dense layers own no index branch and no KL
    return records


def run_layout(tmp_path, initial_weights, *layout, nproc):
    return train(tmp_path, *COMMON, f"checkpoint.init_from={initial_weights}", *layout, nproc=nproc)


def assert_same_run(one, other):
    assert [r["train/step"] for r in other] == [1, 2, 3, 4]
    for a, b in zip(one, other):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (a["train/step"], key, a[key], b[key])
        kl_layers = [a[f"msa/kl_loss/layer_{n:02d}"] for n in (3, 4)]
        assert a["train/kl_loss"] == pytest.approx(sum(kl_layers) / 2, rel=1e-6)  # the mean counts MSA layers only


LAYOUTS = {
    "cp2": (["parallel.context_parallel_size=2"], 2),
    "tp2xcp2": (["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2"], 4),
    "tp4_over_2_groups": (["parallel.tensor_model_parallel_size=4"], 4),
    "ep2": (["parallel.expert_model_parallel_size=2"], 2),
    "pp2_first_stage_without_msa": (["parallel.pipeline_model_parallel_size=2"], 2),
    "pp2_virtual2": (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"], 2),
    "dp2_distributed_optimizer": (["parallel.use_distributed_optimizer=true"], 2),
    "selective_recompute": (["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,mlp,moe]"], 1),
    "full_recompute": (["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1"], 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(name, single_process, initial_weights, tmp_path):
    layout, nproc = LAYOUTS[name]
    assert_same_run(single_process, run_layout(tmp_path, initial_weights, *layout, nproc=nproc))
