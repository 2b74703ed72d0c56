#!/usr/bin/env python
"""train.py with a clock on its layers: where a training step's time goes.

    python tools/train_timing.py <the overrides train.py takes>     # or under torchrun

Runs train.py unchanged, with hooks on every transformer layer's self-attention, its core
attention (the attention kernels: dense, MSA, or local, with the index top-k and KL) and its MLP or
MoE block (router, token dispatch and experts, all-to-all included). Forward time is stamped
before and after each call; backward time from the moment the output's gradient is ready (a hook
on the output tensor) to the moment the last input's gradient is (hooks on the inputs), so
nothing is copied or wrapped. Stamps are CUDA events on GPUs (read once per step, after a
synchronize) and wall clock on CPU. Rank 0 appends one record per training step to
<output_dir>/module_times.jsonl: seconds of the step and, summed over layers and micro-batches,
`attention_core_*`, `attention_*` (the whole self-attention block: projections + core) and `mlp_*`
(`_fwd_s`, `_bwd_s`, `_s` = both). What is left (embedding, norms, logits and loss, optimizer
step, gradient all-reduce) is the step minus attention and MLP. The index projections' weight
gradients (the index branch reads a detached input) may land after the attention block's
backward stamp and then count as "left".
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("attention_core", "attention", "mlp")


class _Clock:
    """Stamps: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self):
        import torch

        self.torch, self.cuda = torch, torch.cuda.is_available()

    def stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def synchronize(self):
        if self.cuda:
            self.torch.cuda.synchronize()


class ModuleTimer:
    """Forward and backward time of hooked modules, summed per training step."""

    def __init__(self, clock=None):
        self.clock = clock or _Clock()
        self.calls: list[dict] = []

    def attach(self, model) -> int:
        """Hook the self-attention, core attention and MLP of every transformer layer; returns how many."""
        from megatron.core.transformer.transformer_layer import TransformerLayer

        hooked = 0
        for layer in (m for m in model.modules() if isinstance(m, TransformerLayer)):
            for kind, module in (("attention", layer.self_attention), ("attention_core", layer.self_attention.core_attention),
                                 ("mlp", layer.mlp)):
                module.register_forward_pre_hook(self._before(kind), with_kwargs=True)
                module.register_forward_hook(self._after)
                hooked += 1
        return hooked

    def _before(self, kind):
        def hook(module, args, kwargs):
            call = {"kind": kind, "fwd": [self.clock.stamp()], "bwd_start": None, "bwd_end": []}
            module._timing_call = call
            self.calls.append(call)
            for t in [*args, *kwargs.values()]:
                if _needs_grad(t):
                    t.register_hook(lambda grad, call=call: call["bwd_end"].append(self.clock.stamp()))

        return hook

    def _after(self, module, args, output):
        call = module._timing_call
        call["fwd"].append(self.clock.stamp())
        first = output[0] if isinstance(output, (tuple, list)) else output
        if _needs_grad(first):
            first.register_hook(lambda grad, call=call: call.__setitem__("bwd_start", self.clock.stamp()))

    def begin_step(self) -> None:
        self.calls = []  # drops what validation recorded between steps

    def end_step(self) -> dict:
        """Seconds per kind in the step that just ran (synchronizes the device)."""
        self.clock.synchronize()
        out = {f"{kind}_{part}": 0.0 for kind in KINDS for part in ("fwd_s", "bwd_s", "s")}
        for call in self.calls:
            kind, fwd = call["kind"], self.clock.seconds(*call["fwd"])
            bwd = 0.0
            if call["bwd_start"] is not None and call["bwd_end"]:
                bwd = max(self.clock.seconds(call["bwd_start"], end) for end in call["bwd_end"])
            out[f"{kind}_fwd_s"] += fwd
            out[f"{kind}_bwd_s"] += bwd
            out[f"{kind}_s"] += fwd + bwd
        out["calls"] = len(self.calls)
        self.calls = []
        return out


def _needs_grad(t) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and t.requires_grad


def install(timer: ModuleTimer) -> None:
    """Hook every model the trainer builds, and time and record each training step."""
    from msa_megatron.training import loop

    build = loop.build_model
    train_step = loop.Trainer.train_step

    def build_and_hook(*args, **kwargs):
        model = build(*args, **kwargs)
        timer.attach(model)
        return model

    def timed_step(trainer):
        timer.begin_step()
        t0 = time.perf_counter()
        result = train_step(trainer)
        parts = timer.end_step()
        if trainer.topo.rank == 0:
            record = {"train/step": trainer.state.step, "step_s": time.perf_counter() - t0, **parts}
            with open(os.path.join(trainer.cfg.output_dir, "module_times.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        return result

    loop.build_model = build_and_hook
    loop.Trainer.train_step = timed_step


def main() -> None:
    sys.path.insert(0, ROOT)
    install(ModuleTimer())
    train = os.path.join(ROOT, "train.py")
    sys.argv = [train, *sys.argv[1:]]
    runpy.run_path(train, run_name="__main__")


if __name__ == "__main__":
    main()
