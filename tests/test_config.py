"""Config schema: Hydra presets compose and validate; bad values give one line naming the key."""

import pytest
from hydra import compose, initialize_config_dir

from msa_megatron.config import ConfigError, load_config, register_hydra_schema, validate
from tests.paths import CONF_DIR


register_hydra_schema()


def composed(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_quickstart_composes():
    cfg = load_config(composed())
    assert cfg.model.name == "tiny" and cfg.attention.type == "msa"
    assert cfg.attention.block_size == 32 and cfg.stage.warmup_tokens == 16384  # recipe tiny_cpu applied
    assert cfg.data.type == "indexed" and cfg.model.vocab_size == 8192  # on the embedded corpus
    assert load_config(composed("data=mock")).data.type == "mock"
    assert cfg.output_dir.endswith("tiny-msa-msa_pt")


def test_pilot_model_and_gqa_presets():
    cfg = load_config(composed("model=msa10b_pilot", "~recipe", "attention=msa"))
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels) == (16, 2048, 32, 4, 128)
    assert (m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size) == (64, 4, 1536)
    assert cfg.attention.block_size == 128 and cfg.attention.topk_blocks == 16
    assert load_config(composed("attention=gqa")).attention.type == "gqa"
    assert load_config(composed("parallel=gpu")).parallel.distributed_backend == "nccl"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.num_attention_heads=6", "model.num_query_groups=4"], "model.num_attention_heads=6"),
        (["attention.topk_blocks=0"], "attention.topk_blocks=0"),
        (["attention.block_size=48"], "attention.block_size=48"),
        (["model.num_attention_heads=12", "model.num_query_groups=4", "parallel.tensor_model_parallel_size=6"],
         "parallel.tensor_model_parallel_size=6"),
        # impossible parallel layouts, refused before any work (issue 7, item 6)
        (["parallel.expert_model_parallel_size=3"], "parallel.expert_model_parallel_size=3"),
        (["parallel.pipeline_model_parallel_size=3"], "parallel.pipeline_model_parallel_size=3"),
        (["parallel.context_parallel_size=2", "data.seq_length=250"], "data.seq_length=250"),
        (["parallel.tensor_model_parallel_size=4", "parallel.context_parallel_size=2", "data.seq_length=12"], "data.seq_length=12"),
        (["model.num_query_groups=1", "parallel.tensor_model_parallel_size=4", "attention.index_head_dim=6", "attention.index_rope=false",
          "model.kv_channels=16"], "parallel.tensor_model_parallel_size=4"),
        (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"],
         "parallel.virtual_pipeline_model_parallel_size=2"),
        (["attention.dense_layers=[0,2]"], "attention.dense_layers=[0, 2]"),
        (["model.moe_layer_freq=[0,2]"], "model.moe_layer_freq=[0, 2]"),
        (["model.recompute_granularity=full"], "model.recompute_method=None"),
        (["model.recompute_granularity=selective", "model.recompute_modules=[attn]"], "model.recompute_modules=['attn']"),
        (["model.recompute_granularity=selective", "model.recompute_modules=[layernorm]"], "model.recompute_modules=['layernorm']"),
        (["attention.backend=cuda"], "attention.backend='cuda'"),
        (["stage.mode=sparse"], "stage.mode='sparse'"),
        (["attention.kl.coeff=-1"], "attention.kl.coeff=-1.0"),
        (["attention.recall_queries=-1"], "attention.recall_queries=-1"),
        (["train.steps=0"], "train.steps=0"),
        (["optim.min_lr=1.0"], "optim.min_lr=1.0"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(composed(*overrides))
    msg = str(e.value)
    assert msg.startswith(key) and "\n" not in msg, msg


def test_type_errors_are_one_line_with_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(composed("train.steps=many"))
    assert "train.steps" in str(e.value) and "\n" not in str(e.value)


def test_world_size_checks():
    cfg = load_config(composed("train.global_batch_size=3"))
    with pytest.raises(ConfigError, match=r"^train.global_batch_size=3: must be a multiple of micro_batch_size\*data_parallel=2"):
        validate(cfg, world_size=2)
    cfg = load_config(composed("parallel.tensor_model_parallel_size=2"))
    with pytest.raises(ConfigError, match="^parallel="):
        validate(cfg, world_size=3)
    cfg = load_config(composed("parallel.expert_model_parallel_size=4"))  # 4 experts over 4 ranks, but only 2 ranks
    with pytest.raises(ConfigError, match=r"^parallel.expert_model_parallel_size=4: .* must divide data\*tensor\*context parallel ranks=2"):
        validate(cfg, world_size=2)
    cfg = load_config(composed("model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
                               "parallel.virtual_pipeline_model_parallel_size=2", "train.global_batch_size=3"))
    with pytest.raises(ConfigError, match=r"^train.global_batch_size=3: gives 3 micro-batches .* multiple of pipeline_model_parallel_size=2"):
        validate(cfg, world_size=2)


def test_every_schema_key_can_be_overridden():
    cfg = load_config(composed("train.eval_interval=3", "attention.kl.coeff=0.5", "logging.wandb.mode=online"))
    assert cfg.train.eval_interval == 3 and cfg.attention.kl.coeff == 0.5 and cfg.logging.wandb.mode == "online"
