"""The planner (msa_megatron/plan.py) against real models, hand arithmetic and the dry-run CLI.

Honesty: one 4-rank gloo launch (tests/plan_probe.py) builds real models for every parallel kind
(TP, TP > KV groups, CP, EP + ETP, PP even / uneven / virtual, DP with the distributed optimizer,
tied embeddings, dense-attention and dense-FFN layers, a shared expert, the GQA baseline) and every
rank's parameter count must equal the planner's exactly; its optimizer shard and, for layouts
without pipelining, the bytes autograd keeps for one micro-batch must match the planner closely.
"""

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from msa_megatron import plan
from msa_megatron.config import load_config, register_hydra_schema
from tests.paths import CONF_DIR, ROOT
from tests.runs import _free_port as free_port

register_hydra_schema()


def composed(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return load_config(compose(config_name="config", overrides=list(overrides)))


# ------------------------------------------------------------------------ the 109B model by hand


def test_109b_totals_match_the_hand_computation():
    """conf/model/msa109b.yaml: h = 3072, 64 q / 4 kv heads of 128, index dim 128, vocab 200,064.

    per layer (41): linear_qkv (64 + 2*4)*128*3072 = 28,311,552; linear_proj 64*128*3072 = 25,165,824
                    -> attention 53,477,376 (x41 = 2,192,572,416)
                    index: Wqi 4*128*3072 = 1,572,864 + Wki 128*3072 = 393,216 + norms 2*128
                    -> 1,966,336 (x41 = 80,619,776)
                    norms 2*3072 (x41 + final norm 3072 = 254,976)
    dense FFN (3 layers): 3*11520*3072 = 106,168,320 (x3 = 318,504,960)
    MoE (38 layers): router 128*3072 (x38 = 14,942,208)
                     routed 128 * 3*2304*3072 = 2,717,908,992 (x38 = 103,280,541,696)
                     shared 3*2304*3072 = 21,233,664 (x38 = 806,879,232)
    embedding and output layer: 200,064*3072 = 614,596,608 each (x2 = 1,229,193,216)
    total = 107,923,508,480
    a token skips 124 of 128 routed experts in 38 layers: 38*124*21,233,664 = 100,053,024,768
    active = 7,870,483,712; without embedding and output layer 6,641,290,496
    """
    cfg = composed("recipe=msa109b_pt")
    p = plan.model_params(cfg)
    assert p["total"] == 107_923_508_480
    assert p["active"] == 7_870_483_712
    assert p["active_without_embeddings"] == 6_641_290_496
    assert p["parts"]["routed_experts"] == 103_280_541_696 and p["parts"]["index_branch"] == 80_619_776
    # every rank of the layout together holds each routed expert once per expert-data-parallel replica
    lay = plan.layout_of(cfg)
    experts = sum(plan.expert_count(plan.stage_params(cfg, lay, r)) for r in range(lay.pp)) * lay.ep
    assert experts == p["parts"]["routed_experts"]


def test_109b_attention_flops_ratio_at_1m_is_the_papers():
    """MSA.md: at N = 2^20, dense GQA 17.18 GFLOP vs MSA 0.537 + 0.067 per token and layer: 28.4x."""
    cfg = composed("recipe=msa109b_pt")
    ratio = plan.training_flops(cfg, 1048576)["attention_dense_over_msa"]
    assert ratio == pytest.approx(28.4, abs=0.1)


# ---------------------------------------------------------------- real models, every parallel kind

MODEL = {
    "num_layers": 4, "hidden_size": 64, "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 16,
    "ffn_hidden_size": 96, "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 64,
    "moe_shared_expert_intermediate_size": 32, "moe_layer_freq": [0, 1, 1, 1], "vocab_size": 500, "qk_layernorm": True,
}
BASE = {
    "model": MODEL,
    "attention": {"block_size": 16, "topk_blocks": 3, "index_head_dim": 16, "dense_layers": [1]},
    "data": {"seq_length": 256},
    "train": {"global_batch_size": 4},
}
# One forward of a packed bf16 micro-batch with the core attention checkpointed (the kernels'
# internals differ between the CPU reference and the GPU; their inputs do not).
MEASURE = {
    "train": {"global_batch_size": 4, "precision": "bf16"},
    "data": {"seq_length": 512, "mock_min_doc": 100, "mock_max_doc": 600},
    "model": {**MODEL, "recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "measure_activations": True,
}


def case(parallel=None, **groups):
    out = json.loads(json.dumps(BASE))
    for group, values in groups.items():
        out[group] = {**out.get(group, {}), **values} if isinstance(values, dict) else values
    out["parallel"] = parallel or {}
    return out


def measured(parallel, **groups):
    merged = {**MEASURE, **groups}
    merged["model"] = {**MEASURE["model"], **groups.get("model", {})}
    return case(parallel, **merged)


TIED = {**MODEL, "untie_embeddings_and_output_weights": False}
CASES = {
    "dp4_distributed_optimizer": case({"use_distributed_optimizer": True}),
    "tp2": case({"tensor_model_parallel_size": 2}),
    "tp4_over_2_groups": case({"tensor_model_parallel_size": 4}),
    "tp2_cp2_distributed_optimizer": case({"tensor_model_parallel_size": 2, "context_parallel_size": 2, "use_distributed_optimizer": True}),
    "ep4_distributed_optimizer": case({"expert_model_parallel_size": 4, "use_distributed_optimizer": True}),
    "tp2_ep2_etp2": case({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 2}),
    "pp2_uneven_3_1": case({"pipeline_model_parallel_size": 2, "num_layers_in_first_pipeline_stage": 3, "num_layers_in_last_pipeline_stage": 1}),
    "pp4": case({"pipeline_model_parallel_size": 4}),
    "pp2_virtual2_distributed_optimizer": case(
        {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2, "use_distributed_optimizer": True}
    ),
    "pp2_tied_embeddings": case({"pipeline_model_parallel_size": 2}, model=TIED),
    "tp2_tied_embeddings": case({"tensor_model_parallel_size": 2}, model=TIED),
    "gqa_tp2": case({"tensor_model_parallel_size": 2}, attention={"type": "gqa"}),
    "dense_ffn_only_tp2_pp2": case(
        {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, model={**MODEL, "num_moe_experts": None, "moe_layer_freq": 1}
    ),
    "activations_dp4": measured({}),
    "activations_tp2_sequence_parallel": measured({"tensor_model_parallel_size": 2}),
    "activations_tp4_over_2_groups": measured({"tensor_model_parallel_size": 4}),
    "activations_tp2_cp2": measured({"tensor_model_parallel_size": 2, "context_parallel_size": 2}),
    "activations_ep2_tp2": measured({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1}),
    "activations_moe_mlp_recomputed": measured({}, model={"recompute_modules": ["core_attn", "moe", "mlp"]}),
    "activations_full_recompute": measured(
        {}, model={"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2, "recompute_modules": None}
    ),
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    cases, out = tmp / "cases.json", tmp / "out.json"
    cases.write_text(json.dumps(CASES))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={free_port()}",
           os.path.join(ROOT, "tests", "plan_probe.py"), str(cases), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


def planned(name):
    raw = {k: v for k, v in CASES[name].items() if k != "measure_activations"}
    cfg = load_config(raw)
    return cfg, plan.layout_of(cfg, gpus=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_parameters_per_rank_equal_the_real_modules(probed, name):
    cfg, lay = planned(name)
    ranks = probed[name]
    assert sorted({r["pp_rank"] for r in ranks}) == list(range(lay.pp))
    for rank in ranks:
        parts = plan.stage_params(cfg, lay, rank["pp_rank"])
        assert (rank["params"], rank["expert_params"]) == (sum(parts.values()), plan.expert_count(parts)), (name, rank)
        if cfg.parallel.use_distributed_optimizer:
            mem = plan.stage_memory(cfg, lay, rank["pp_rank"], sparse=True, device="cpu")
            shard = mem.optimizer_distributed / (12 if cfg.train.precision == "bf16" else 8)
            # the distributed optimizer pads its buckets: a rank's shard is the even share +-1%
            assert rank["optimizer_params"] == pytest.approx(shard, rel=0.01), (name, rank)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CASES if "measure_activations" in CASES[n]])
def test_activation_bytes_match_what_autograd_keeps(probed, name):
    cfg, lay = planned(name)
    expected = sum(plan.microbatch_activations(cfg, lay, 0, sparse=False, device="cpu").values())
    got = [r["saved_bytes"] for r in probed[name]]
    if lay.ep > 1:  # routing is not balanced per rank; the mean over the ranks is
        got = [sum(got) / len(got)]
    for value in got:
        assert value == pytest.approx(expected, rel=0.01), (name, got, expected)


# --------------------------------------------------------------------------------- the dry run


def dry_run(*overrides, cwd=None):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *overrides, "dry_run=true"],
        cwd=cwd or ROOT, capture_output=True, text=True, timeout=120,
    )
    return proc


RECIPES = ["msa109b_pt", "msa109b_pt_128k", "msa109b_cpt", "msa10b_pilot"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_plans_and_fits(recipe, tmp_path):
    proc = dry_run(f"recipe={recipe}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("total_params", "active_params", "params_per_gpu", "memory_per_gpu_gib", "fits", "flops_per_token",
                "step_time_s", "tokens_per_day"):
        assert key in summary
    assert summary["fits"] and summary["memory_per_gpu_gib"]["total"] <= summary["gpu_memory_gib"]
    for key in ("weights", "grads", "optimizer_with_distributed", "optimizer_without_distributed", "activations",
                "msa_buffers", "transient"):
        assert key in summary["memory_per_gpu_gib"]
    assert {"32768", "131072", "1048576"} <= set(summary["flops_per_token"])
    assert os.listdir(tmp_path) == []  # a dry run writes nothing
    assert summary["submit"].startswith("sbatch --nodes=")


def test_109b_recipes_use_256_gpus_and_their_slurm_script():
    for recipe, script in (("msa109b_pt", "pretrain"), ("msa109b_pt_128k", "pretrain"), ("msa109b_cpt", "cpt")):
        summary = json.loads(dry_run(f"recipe={recipe}").stdout.strip().splitlines()[-1])
        assert summary["gpus"] == 256
        assert f"slurm/{script}.sbatch recipe={recipe}" in summary["submit"]


def test_a_layout_that_does_not_fit_stops_with_one_line(tmp_path):
    proc = dry_run("recipe=msa109b_pt", "parallel.context_parallel_size=1", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("plan error: does not fit: pipeline stage 0 needs")
    assert "largest term: activations" in lines[0] and "parallel.context_parallel_size" in lines[0]
    assert os.listdir(tmp_path) == []
    assert json.loads(proc.stdout.strip().splitlines()[-1])["fits"] is False
    proc = dry_run("recipe=msa109b_pt", "parallel.use_distributed_optimizer=false", "parallel.expert_model_parallel_size=2",
                   "parallel.context_parallel_size=1", "model.recompute_granularity=full", "model.recompute_method=uniform",
                   "model.recompute_num_layers=1", "model.recompute_modules=null")
    assert proc.returncode == 2
    assert "largest term: optimizer states" in proc.stderr and "parallel.use_distributed_optimizer=true" in proc.stderr


def test_an_impossible_layout_is_a_config_error():
    proc = dry_run("recipe=msa109b_pt", "parallel.expert_model_parallel_size=3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: parallel.expert_model_parallel_size=3: must divide model.num_moe_experts=128"


def test_readme_shows_the_dry_run_as_it_prints():
    """README "Train the 109B model": the command, its output (report and JSON line) as printed."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Train the 109B model", 1)[1].split("\n## ", 1)[0]
    command = ".venv/bin/python train.py recipe=msa109b_pt dry_run=true"
    assert f"$ {command}" in section
    shown = section.split(f"$ {command}\n", 1)[1].split("```", 1)[0]
    proc = dry_run("recipe=msa109b_pt")
    assert proc.returncode == 0
    assert shown.strip() == proc.stdout.strip()
    submit = json.loads(proc.stdout.strip().splitlines()[-1])["submit"]
    assert submit + " data=<your data preset>" in section
    command = ".venv/bin/python train.py recipe=msa109b_pt dry_run=true parallel.context_parallel_size=1"
    shown = section.split(f"$ {command} > /dev/null\n", 1)[1].split("\n", 1)[0]
    proc = dry_run("recipe=msa109b_pt", "parallel.context_parallel_size=1")
    assert proc.returncode == 2 and shown == proc.stderr.strip()
    for recipe in ("msa109b_pt_128k", "msa109b_cpt"):  # the other submission lines, as their dry runs print them
        submit = json.loads(dry_run(f"recipe={recipe}").stdout.strip().splitlines()[-1])["submit"]
        submit = submit.replace(" checkpoint.init_from=<dense GQA checkpoint directory>", "")
        assert any(line.startswith(submit + " ") for line in section.splitlines()), submit


# ------------------------------------------------------------------- the GPU check, run on CPU


@pytest.mark.slow
def test_check_plan_tool_end_to_end_on_cpu(tmp_path):
    """tools/check_plan.py (the 4-GPU proxy check) with its tiny CPU settings: it trains each
    variant, reads metrics.jsonl, plans the same config and reports the ratios."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "check_plan.py"), "--gpus", "1", "--cpu", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "check_plan.json").read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"msa", "gqa"}
    for r in results.values():
        m, p = r["measured"], r["planned"]
        assert "error" not in m and m["step_time_s"] > 0 and m["steps_timed"] == 2
        assert m["peak_gib"] is None  # no CUDA memory on a CPU
        assert p["peak_gib"] > 0 and p["tokens_per_step"] == 2 * 256  # 2 micro-batches of 256 tokens
        assert r["time_ratio"] == pytest.approx(m["step_time_s"] / p["step_time_s"], rel=1e-2)
        assert r["tokens_per_s"] == pytest.approx(512 / m["step_time_s"])
    assert results["msa"]["planned"]["stage"] == "sparse" and results["gqa"]["planned"]["stage"] == "dense"
    speed = results["msa"]["tokens_per_s"] / results["gqa"]["tokens_per_s"]
    assert results["msa"]["speed_vs_gqa"] == pytest.approx(speed, abs=1e-3)
    table = (tmp_path / "check_plan.md").read_text()
    assert "| single | msa | sparse |" in table and "| single | gqa | dense |" in table


def test_a_resume_may_change_what_the_dry_run_plans_for():
    """cluster.* and dry_run describe the plan, not the run: resuming with other values is allowed."""
    from msa_megatron.training.resume_check import config_tree, refused_changes

    saved = config_tree(load_config({"train": {"steps": 40}}))
    planned_elsewhere = load_config({"train": {"steps": 40}, "cluster": {"nodes": 4, "gpu_memory_gib": 140, "assumed_mfu": 0.4}})
    assert refused_changes(saved, planned_elsewhere) == []
    assert [k for k, _, _ in refused_changes(saved, load_config({"train": {"steps": 40, "seed": 7}}))] == ["train.seed"]
