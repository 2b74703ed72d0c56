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
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    all_gather_last_dim_from_tensor_parallel_region,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import init_method_normal

from msa_megatron.model.norms import rms_norm


class MSAIndexer(MegatronModule):
    def __init__(self, config, msa, pg_collection):
        super().__init__(config=config)
        self.msa = msa
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        self.head_dim = msa.index_head_dim
        groups = config.num_query_groups
        self.replicas = tp // groups if tp > groups else 1  # TP ranks sharing one KV group
        self.groups_per_rank = max(groups // tp, 1)
        init = init_method_normal(msa.index_init_std)
        self.linear_q = ColumnParallelLinear(
            config.hidden_size,
            config.num_query_groups * self.head_dim,
            config=config,
            init_method=init,
            gather_output=False,
            bias=False,
            skip_bias_add=True,
            is_expert=False,
            tp_group=self.tp_group,
        )
        # Created where megatron creates its weights, so the TP broadcast below works on NCCL too.
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        factory = dict(dtype=config.params_dtype, device=device)
        self.linear_k = torch.nn.Linear(config.hidden_size, self.head_dim, bias=False, **factory)
        with torch.no_grad():
            init(self.linear_k.weight)
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
        ki = F.linear(x, self.linear_k.weight)
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
