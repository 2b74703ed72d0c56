"""Training stages as a function of consumed tokens (so a resumed job lands in the right stage).

MSA-PT and MSA-CPT: dense warmup (full attention, dense KL) for `stage.warmup_tokens`, then
sparse. `stage.mode=dense` stays in the dense warmup form for the whole run. The dense GQA
baseline (`attention.type=gqa`) and the local-only baseline (`attention.type=local`) have no stages.
"""

from __future__ import annotations


def is_sparse_stage(cfg, consumed_tokens: int) -> bool:
    if cfg.attention.type != "msa" or cfg.stage.mode == "dense":
        return False
    return consumed_tokens >= cfg.stage.warmup_tokens


def stage_name(cfg, consumed_tokens: int) -> str:
    if cfg.attention.type != "msa":
        return cfg.attention.type  # gqa | local
    return "sparse" if is_sparse_stage(cfg, consumed_tokens) else "dense"
