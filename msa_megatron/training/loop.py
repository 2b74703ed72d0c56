"""The training loop on megatron-core: schedules, DDP, distributed optimizer, LR schedule, stages."""

from __future__ import annotations

import functools
import itertools
import logging
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from msa_megatron import flops
from msa_megatron.config import (
    RunConfig,
    load_config,
    num_microbatches,
    to_transformer_config,
    tokens_per_step,
    validate,
    warmup_steps,
)
from msa_megatron.data import build_data
from msa_megatron.model.attention import msa_core_attentions, set_measure_recall, set_sparse_stage
from msa_megatron.model.builder import build_model
from msa_megatron.training import checkpoint, evaluation, preflight
from msa_megatron.training.checkpoint import TrainState
from msa_megatron.parallel.context import lm_loss_scale
from msa_megatron.training.distributed import init_distributed, shutdown
from msa_megatron.training.metric_streams import separate_stream
from msa_megatron.training.metrics import MetricsWriter, memory_metrics, throughput_metrics
from msa_megatron.training.signals import ExitRequest
from msa_megatron.training.stages import is_sparse_stage, stage_name


def run(cfg) -> dict:
    """Train as configured; returns the last log record (on every rank)."""
    cfg = cfg if isinstance(cfg, RunConfig) else load_config(cfg)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines drown the step lines
    preflight.check(cfg)  # user errors, before any process group, model or file
    topo = init_distributed(cfg)
    try:
        return Trainer(cfg, topo).train()
    finally:
        shutdown()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def lm_loss_func(loss_mask: torch.Tensor, output: torch.Tensor, cp_group=None):
    """3-tuple loss: (sum of masked token losses, token count, report). The schedule averages.

    Under context parallelism the count is the micro-batch's (all CP ranks) and the sum is scaled
    by the CP size, which DDP's average over CP undoes (parallel/context.lm_loss_scale).
    """
    mask = loss_mask.view(-1).float()
    loss_sum = (output.view(-1).float() * mask).sum()
    count = mask.sum()
    report = {"lm_loss": torch.stack([loss_sum.detach().clone(), count.detach()])}
    if cp_group is not None and cp_group.size() > 1:
        total, cp = lm_loss_scale(loss_mask, cp_group)
        return loss_sum * cp, total.to(torch.int), report
    return loss_sum, count.to(torch.int), report


def _local_batch(data_iterator, sample_len: int):
    """The next micro-batch on this device; CP ranks keep their share of the tokens."""
    batch = next(data_iterator).to(_device())
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        batch = batch.split_for_context_parallel(sample_len, cp, ps.get_context_parallel_rank())
    return batch


def forward_step(data_iterator, model, sample_len: int = 0):
    """One micro-batch through this stage's model chunk."""
    batch = _local_batch(data_iterator, sample_len)
    output = model(batch.tokens, batch.position_ids, None, labels=batch.labels, packed_seq_params=batch.packed_seq_params())
    cp_group = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    return output, functools.partial(lm_loss_func, batch.loss_mask, cp_group=cp_group)


def validation_forward_step(data_iterator, model, sample_len: int = 0, edges=()):
    """One validation micro-batch: the last stage returns logits, which training/evaluation.py scores."""
    batch = _local_batch(data_iterator, sample_len)
    output = model(batch.tokens, batch.position_ids, None, packed_seq_params=batch.packed_seq_params())
    return output, functools.partial(evaluation.validation_loss_func, batch, list(edges))


class Trainer:
    def __init__(self, cfg: RunConfig, topo):
        self.cfg, self.topo = cfg, topo
        validate(cfg, world_size=topo.world_size)
        self.num_microbatches = num_microbatches(cfg, topo.world_size)
        cpu_init = cfg.model.use_cpu_initialization or not torch.cuda.is_available()
        self.tconfig = to_transformer_config(cfg, use_cpu_initialization=cpu_init)
        vpp = cfg.parallel.virtual_pipeline_model_parallel_size
        stages = [None] if not vpp else list(range(vpp))  # virtual pipeline: one model chunk per stage
        chunks = [build_model(cfg, self.tconfig, vp_stage=v) for v in stages]
        self.state, resumed_meta = TrainState(), {}
        resuming = checkpoint.latest_step(cfg.checkpoint.load) is not None
        if cfg.checkpoint.init_from and not resuming:  # before the optimizer copies the weights
            fresh = checkpoint.init_weights(chunks, cfg.checkpoint.init_from, cfg.checkpoint.init_allow_missing)
            self._say(f"initialised weights from {cfg.checkpoint.init_from}; freshly initialised: {len(fresh)} tensors")
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        # `self.model`: the model chunks of this rank, DDP-wrapped (one unless virtual pipeline).
        self.model = [
            DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        no_sync = [chunk.no_sync for chunk in self.model]
        self.tconfig.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        self.tconfig.grad_scale_func = self.optimizer.scale_loss
        if resuming:
            self.state, resumed_meta = checkpoint.resume(self, cfg.checkpoint.load, say=self._say)
            self._say(
                f"resumed from {cfg.checkpoint.load} at step {self.state.step} "
                f"({self.state.consumed_tokens:,} tokens, stage {stage_name(cfg, self.state.consumed_tokens)})"
            )
        self.data = build_data(
            cfg, dp_rank=topo.dp_rank, dp_size=topo.dp_size, consumed_microbatches=self.state.step * self.num_microbatches
        )
        self.metrics = MetricsWriter(
            cfg, cfg.output_dir, active=topo.is_logger, resume_step=self.state.step, wandb_run_id=resumed_meta.get("wandb_run_id")
        )
        self.forward_step = functools.partial(forward_step, sample_len=cfg.data.seq_length)
        self.msa_layers = msa_core_attentions(self.model)
        self.exit_request = ExitRequest(_device())
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        self.peak_flops = flops.peak_flops_per_gpu(cfg.train.precision, device_name, cfg.logging.peak_tflops_per_gpu)

    def _build_optimizer(self):
        o, bf16 = self.cfg.optim, self.cfg.train.precision == "bf16"
        config = OptimizerConfig(
            optimizer=o.optimizer,
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
        )
        overrides = get_standard_config_overrides(config)  # no weight decay on norms and biases
        if o.index_lr is not None:  # the index projections' own LR: a param group, not freezing
            overrides[ParamKey(name="*.indexer.*")] = {"max_lr": o.index_lr, "min_lr": o.index_lr * o.min_lr / o.lr}
        return get_megatron_optimizer(config, self.model, config_overrides=overrides)

    def _build_scheduler(self):
        o, gbs, steps = self.cfg.optim, self.cfg.train.global_batch_size, self.cfg.train.steps
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=warmup_steps(self.cfg) * gbs,
            lr_decay_steps=steps * gbs,
            lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=steps * gbs,
            wd_incr_style="constant",
            # a resume follows this config's schedule (checkpoint.resume logs any change); only the
            # step count comes from the checkpoint
            override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False,
        )

    # ------------------------------------------------------------------ steps

    def _say(self, message: str) -> None:
        if self.topo.rank == 0:
            print(message, flush=True)

    def train_step(self) -> tuple[list, float]:
        cfg, state = self.cfg, self.state
        set_sparse_stage(self.model, is_sparse_stage(cfg, state.consumed_tokens))
        interval = cfg.attention.recall_interval
        set_measure_recall(self.model, interval > 0 and (state.step + 1) % interval == 0)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=self._per_chunk(self.data.train),
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=cfg.train.micro_batch_size * cfg.data.seq_length,
            micro_batch_size=1,
            forward_only=False,
        )
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=cfg.train.global_batch_size)
        state.step += 1
        state.consumed_tokens += tokens_per_step(cfg)
        return losses, grad_norm

    def _per_chunk(self, iterator):
        """The schedule's data iterator(s): with virtual pipeline every model chunk reads the same
        micro-batches, each through its own iterator."""
        return list(itertools.tee(iterator, len(self.model))) if len(self.model) > 1 else iterator

    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        t, ck = cfg.train, cfg.checkpoint
        record, window = {}, _Window()
        start = time.perf_counter()
        while state.step < t.steps:
            t0 = time.perf_counter()
            losses, grad_norm = self.train_step()
            window.add(losses, grad_norm, time.perf_counter() - t0)
            done, last = state.step, state.step == t.steps
            exiting = not last and ((bool(t.exit_interval) and done % t.exit_interval == 0) or self.exit_request.agreed())
            if done % t.log_interval == 0 or last or exiting:
                record = self._log(done, window, time.perf_counter() - start)
                window = _Window()
            if ck.save and (last or exiting or (ck.save_interval and done % ck.save_interval == 0)):
                path = checkpoint.save(self, state, self.metrics.wandb_run_id)
                self._say(f"saved checkpoint {path}")
            if self.data.valid is not None and t.eval_interval and (done % t.eval_interval == 0 or last):
                self.evaluate(done)  # after the save: a failing validation never costs the checkpoint
            if exiting:
                why = self.exit_request.reason or f"train.exit_interval={t.exit_interval}"
                self._say(f"exiting at step {done} ({why}); rerun the same command to resume")
                break
        self.metrics.close()
        return record

    def stage_name(self, consumed_tokens: int) -> str:
        return stage_name(self.cfg, consumed_tokens)

    # ------------------------------------------------------------------ logging

    def _reduce(self, lm_sum: float, lm_tokens: float):
        """Global LM loss, per-layer KL and recall since the last call (collective on every rank).

        One all-reduce over the world: the LM numbers come from one rank per data-parallel replica
        (last pipeline stage, TP rank 0); each rank adds its layers' KL, partial over its KV groups
        (the TP ranks' parts sum to the layer's KL; pipeline stages own disjoint layers), then the
        sum over data-parallel replicas is divided by their number.
        """
        num_layers = self.cfg.model.num_layers
        # [lm_sum, lm_tokens, kl per layer (L), kl seen (L), recall sums (2), recall count]
        vec = torch.zeros(2 + 2 * num_layers + 3, dtype=torch.float64, device=_device())
        if ps.is_pipeline_last_stage() and self.topo.tp_rank == 0:
            vec[0], vec[1] = lm_sum, lm_tokens
        for layer in self.msa_layers:
            st, i = layer.stats, layer.layer_number - 1
            if st.count:
                vec[2 + i] = st.kl_sum.double() / st.count
                vec[2 + num_layers + i] = 1.0
            vec[-3] += st.recall_sum[0]
            vec[-2] += st.recall_sum[1]
            vec[-1] += st.recall_count
            st.reset()
        dist.all_reduce(vec)
        lm = float(vec[0] / vec[1]) if vec[1] > 0 else None
        kl_layers = {i + 1: float(vec[2 + i]) / self.topo.dp_size for i in range(num_layers) if vec[2 + num_layers + i] > 0}
        recall = (float(vec[-3] / vec[-1]), float(vec[-2] / vec[-1])) if vec[-1] > 0 else None
        return lm, kl_layers, recall

    def _log(self, step: int, window: "_Window", elapsed: float) -> dict:
        cfg, topo = self.cfg, self.topo
        lm, kl_layers, recall = self._reduce(window.lm_sum, window.lm_tokens)
        moe = self._moe_losses(window.steps)
        consumed_before_last = self.state.consumed_tokens - tokens_per_step(cfg)
        per_sec = window.steps * tokens_per_step(cfg) / max(window.seconds, 1e-9)
        record = {
            "train/step": step,
            "train/lm_loss": lm,
            "train/kl_loss": _mean(kl_layers),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/grad_norm": window.grad_norm,
            "train/tokens": self.state.consumed_tokens,
            "train/tokens_per_sec": per_sec,
            "train/tokens_per_sec_per_gpu": per_sec / topo.world_size,
            "train/step_time_s": window.seconds / window.steps,
            "msa/stage": int(is_sparse_stage(cfg, consumed_before_last)),
            "msa/stage_name": stage_name(cfg, consumed_before_last),
            "eta_s": (cfg.train.steps - step) * window.seconds / window.steps,
            "elapsed_s": elapsed,
        }
        for layer, value in kl_layers.items():
            record[f"msa/kl_loss/layer_{layer:02d}"] = value
        if recall is not None:
            record["msa/block_recall"], record["msa/score_recall"] = recall
        for name, value in moe.items():
            record[f"moe/{name}"] = value
        sparse = is_sparse_stage(cfg, consumed_before_last)
        record.update(throughput_metrics(flops.training_flops_per_token(cfg, sparse), per_sec / topo.world_size, self.peak_flops))
        record.update(memory_metrics(_device()))
        self.metrics.log(record)
        return record

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """LM and KL loss over the validation stream, in the stage of the current step, and the
        loss by position / retrieval accuracy by distance of training/evaluation.py."""
        batches = list(self.data.valid())
        edges = evaluation.bucket_edges(self.cfg.data.seq_length)
        set_measure_recall(self.model, False)
        for chunk in self.model:
            chunk.eval()
        # validation's KL and router statistics go to their own trackers, not the training window's
        with separate_stream(self.msa_layers):
            try:
                losses = get_forward_backward_func()(
                    forward_step_func=functools.partial(validation_forward_step, sample_len=self.cfg.data.seq_length, edges=edges),
                    data_iterator=self._per_chunk(iter(batches)),
                    model=self.model,
                    num_microbatches=len(batches),
                    seq_length=self.cfg.train.micro_batch_size * self.cfg.data.seq_length,
                    micro_batch_size=1,
                    forward_only=True,
                )
            finally:
                for chunk in self.model:
                    chunk.train()
            window = _Window()
            window.add(losses, None, 0.0)
            lm, kl_layers, _ = self._reduce(window.lm_sum, window.lm_tokens)
        contributes = ps.is_pipeline_last_stage() and self.topo.tp_rank == 0
        buckets = evaluation.reduce_buckets(losses, edges, contributes, _device())
        record = {"train/step": step, "val/lm_loss": lm, "val/kl_loss": _mean(kl_layers), **buckets}
        self.metrics.log_validation(record)
        return record

    def _moe_losses(self, steps: int) -> dict:
        if self.cfg.model.num_moe_experts is None:
            return {}
        totals: dict = {}
        get_moe_metrics_tracker().report(
            loss_scale=1.0 / (self.num_microbatches * steps),
            iteration=0,
            total_loss_dict=totals,
            num_layers=self.cfg.model.num_layers,
            moe_layer_freq=1,
            force_initialize=True,
            track_names=["load_balancing_loss"],
        )
        return {k: float(v) for k, v in totals.items()}


def _mean(values: dict):
    return sum(values.values()) / len(values) if values else None


class _Window:
    """Numbers of the steps since the last log line."""

    def __init__(self):
        self.lm_sum = self.lm_tokens = 0.0
        self.steps = 0
        self.grad_norm = None
        self.seconds = 0.0  # training steps only (validation and logging excluded)

    def add(self, losses: list, grad_norm, seconds: float) -> None:
        for report in losses:  # empty except on the last pipeline stage
            pair = report["lm_loss"]
            self.lm_sum += float(pair[0])
            self.lm_tokens += float(pair[1])
        self.steps += 1
        self.grad_norm = float(grad_norm) if grad_norm is not None else None
        self.seconds += seconds
