"""Process group and model-parallel setup: torchrun/Slurm env, or a single local process."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from msa_megatron import cpu_compat
from msa_megatron.parallel import replicas


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int
    is_logger: bool  # the one rank that prints and writes metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg) -> Topology:
    p = cfg.parallel
    on_gpu = torch.cuda.is_available()
    backend = p.distributed_backend if p.distributed_backend != "auto" else ("nccl" if on_gpu else "gloo")
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if on_gpu:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:  # plain `python train.py`: a world of one
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
    )
    replicas.initialize(cfg.model.num_query_groups)
    seed = cfg.train.seed
    if on_gpu:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu_compat.apply(seed)
    torch.manual_seed(seed)
    return topology()


def topology() -> Topology:
    rank = dist.get_rank()
    last_stage = ps.is_pipeline_last_stage()
    return Topology(
        rank=rank,
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        is_logger=last_stage
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0,
    )


def shutdown() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
