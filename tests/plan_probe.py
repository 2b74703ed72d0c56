"""Build real models for many layouts in one torchrun launch and report what each rank holds.

    torchrun --nproc_per_node N tests/plan_probe.py CASES.json OUT.json

CASES.json: {"name": {"group": {"key": value}}, ...} configs for load_config; each must fit the
world size. For every case, every rank builds its model chunks (as the trainer does, CPU, gloo) and reports
its pipeline rank, parameter count and routed-expert parameter count; with the distributed
optimizer it also wraps them in megatron's DDP, builds the optimizer and reports the parameters of
its optimizer shard; a case with "measure_activations" also runs one forward pass of a packed
micro-batch and reports the bytes autograd saved for backward. Rank 0 writes OUT.json:
{"name": [per rank record, ...]}. tests/test_plan.py compares it with msa_megatron/plan.py.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from msa_megatron.config import load_config, to_transformer_config, validate
from msa_megatron.model.builder import build_model
from msa_megatron.training.distributed import init_distributed


def saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward (no parameters)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch.tokens, batch.position_ids, None, labels=batch.labels, packed_seq_params=batch.packed_seq_params())
    return sum(seen.values())


def probe(cfg) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    init_distributed(cfg)
    tconfig = to_transformer_config(cfg, use_cpu_initialization=True)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = [build_model(cfg, tconfig, vp_stage=v) for v in ([None] if not vpp else range(vpp))]
    named = [(n, p) for chunk in chunks for n, p in chunk.named_parameters()]
    params = [p for _, p in named]
    record = {
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "params": sum(p.numel() for p in params),
        "expert_params": sum(p.numel() for n, p in named if ".mlp.experts." in n),
    }
    if not cfg.parallel.use_distributed_optimizer:  # replicated Adam: nothing to compare beyond the parameters
        return record, chunks
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True),
        model,
    )
    record["optimizer_params"] = sum(
        p.numel() for opt in getattr(optimizer, "chained_optimizers", [optimizer]) for g in opt.optimizer.param_groups for p in g["params"]
    )
    return record, chunks


def main(cases_path: str, out_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    results = {}
    for name, raw in cases.items():
        measure = raw.pop("measure_activations", False)
        cfg = load_config(raw)
        validate(cfg, world_size=int(os.environ["WORLD_SIZE"]))
        record, chunks = probe(cfg)
        if measure:
            record["saved_bytes"] = measure_forward(cfg, chunks[0])
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, record)
        results[name] = everyone
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def measure_forward(cfg, model) -> int:
    """Saved bytes of one forward of micro-batch 0 on this rank (its CP share)."""
    from msa_megatron.data.mock import mock_batches

    d = cfg.data
    batch = next(
        mock_batches(
            vocab_size=cfg.model.vocab_size, seq_length=d.seq_length, micro_batch_size=cfg.train.micro_batch_size,
            min_doc=d.mock_min_doc, max_doc=d.mock_max_doc, seed=cfg.train.seed, dp_rank=0, start=0,
        )
    )
    cp = ps.get_context_parallel_world_size()
    batch = batch.split_for_context_parallel(d.seq_length, cp, ps.get_context_parallel_rank())
    return saved_bytes(model, batch)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
