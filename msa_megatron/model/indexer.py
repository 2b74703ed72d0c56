"""The index branch of one MSA layer: index query / key projections on the detached layer input.

- `linear_q`: one index query head per KV group, column-parallel, so tensor-parallel rank t owns
  exactly the index heads of the KV groups it owns in `linear_qkv` (whole groups, same order).
  With TP > groups each rank computes a slice, all ranks gather them, and each keeps the index
  head of the KV group it replicates (megatron-core does the same for linear_qkv); the gather's
  backward sums the replicas' gradients, each of which counts its group's KL once in all.
- `linear_k`: one index key head shared by all groups, replicated on every TP rank. Each rank's
  KL only reaches it through that rank's groups, so its gradient (and the shared q-norm weight's)
  is summed over TP; the result equals TP=1.
- Optional per-head RMSNorm and the main branch's (partial) RoPE on both (config).
The input is detached: the KL trains these weights only and never reaches the residual stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from dataclasses import dataclass
from typing import Any

from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    all_gather_last_dim_from_tensor_parallel_region,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.utils import init_method_normal

from msa_megatron.model.norms import rms_norm


class ReplicatedLinear(torch.nn.Module):
    """A linear layer with the same weight on every TP rank (megatron's constructor and
    (output, bias) return, so a spec can swap in Transformer Engine's duplicated TELinear)."""

    def __init__(self, input_size, output_size, *, config, init_method, bias=False, **_):
        super().__init__()
        if bias:
            raise ValueError("the MSA index key projection has no bias")
        # Created where megatron creates its weights, so the TP broadcast of the indexer works on NCCL too.
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype, device=device))
        with torch.no_grad():
            init_method(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight), None


@dataclass
class MSAIndexerSubmodules:
    linear_q: Any = ColumnParallelLinear  # index query heads: column-parallel, whole KV groups per rank
    linear_k: Any = ReplicatedLinear  # the shared index key: replicated over TP


class MSAIndexer(MegatronModule):
    def __init__(self, config, submodules: MSAIndexerSubmodules, msa, pg_collection):
        super().__init__(config=config)
        self.msa = msa
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        self.head_dim = msa.index_head_dim
        groups = config.num_query_groups
        self.replicas = tp // groups if tp > groups else 1  # TP ranks sharing one KV group
        self.groups_per_rank = max(groups // tp, 1)
        init = init_method_normal(msa.index_init_std)
        common = dict(config=config, init_method=init, bias=False, skip_bias_add=True, is_expert=False, tp_group=self.tp_group)
        self.linear_q = build_module(
            submodules.linear_q, config.hidden_size, groups * self.head_dim, gather_output=False, **common
        )
        self.linear_k = build_module(
            submodules.linear_k, config.hidden_size, self.head_dim, skip_weight_param_allocation=False, **common
        )
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        factory = dict(dtype=config.params_dtype, device=device)
        if msa.index_norm:
            self.q_norm_weight = torch.nn.Parameter(torch.ones(self.head_dim, **factory))
            self.k_norm_weight = torch.nn.Parameter(torch.ones(self.head_dim, **factory))
        if tp > 1:
            self._sync_replicated_params()

    def _sync_replicated_params(self):
        """Replicated weights start identical on every TP rank (TP rank 0's values)."""
        src = torch.distributed.get_process_group_ranks(self.tp_group)[0]
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # NCCL needs GPU tensors
        for p in self.replicated_parameters():
            buf = p.data.to(device)
            torch.distributed.broadcast(buf, src=src, group=self.tp_group)
            p.data.copy_(buf)

    def replicated_parameters(self):
        names = ["linear_k.weight"] + (["q_norm_weight", "k_norm_weight"] if self.msa.index_norm else [])
        params = dict(self.named_parameters())
        return [params[n] for n in names]

    def forward(self, hidden_states, freqs=None, thd: bool = False):
        """hidden_states [s, b, h] (sequence-sharded under SP) -> qi [.., G_local, di], ki [.., 1, di].

        freqs: RoPE angles per token ([s, b or 1, 1, rot_dim], as the attention uses). THD batches
        (thd=True, b == 1) come back as [t, heads, di].
        """
        x = hidden_states.detach()
        qi, _ = self.linear_q(x)  # gathers the sequence under sequence parallelism
        if self.replicas > 1:
            qi = all_gather_last_dim_from_tensor_parallel_region(qi, group=self.tp_group)
            group = self.tp_group.rank() // self.replicas
            qi = qi[..., group * self.head_dim : (group + 1) * self.head_dim]
        if self.config.sequence_parallel and self.tp_group.size() > 1:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.tp_group)
        ki, _ = self.linear_k(x)
        s, b = qi.shape[:2]
        qi = qi.reshape(s, b, self.groups_per_rank, self.head_dim)
        ki = ki.view(s, b, 1, self.head_dim)
        eps = self.config.layernorm_epsilon
        if self.msa.index_norm:
            qi = rms_norm(qi, copy_to_tensor_model_parallel_region(self.q_norm_weight, group=self.tp_group), eps)
            ki = rms_norm(ki, self.k_norm_weight, eps)
        ki = copy_to_tensor_model_parallel_region(ki, group=self.tp_group)
        if self.msa.index_rope and freqs is not None:
            qi = apply_rotary_pos_emb(qi, freqs, config=self.config)
            ki = apply_rotary_pos_emb(ki, freqs, config=self.config)
        if thd:
            qi, ki = qi.squeeze(1), ki.squeeze(1)
        return qi, ki
