"""Run megatron-core 0.19.2 on a machine without a GPU (CPU tensors, gloo). Applied only then.

megatron-core hard-codes CUDA in places: the model-parallel RNG tracker, `torch.cuda.current_device()`
as a device for new tensors, CUDA streams/events around MoE token dispatch, `device="cuda"` in the
optimizer / schedules / grad clipping, `.cuda()` calls, and type checks against
`torch.cuda.FloatTensor`, and gloo lacks the uneven all-gather / reduce-scatter that the MoE
alltoall dispatcher uses with expert tensor parallelism. Every workaround lives here, so a GPU run
never touches them. They patch
private names, hence the exact version pin below; a different megatron-core fails loudly.

Call `apply(seed)` once per process after `initialize_model_parallel` and before building the model.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

MEGATRON_CORE_VERSION = "0.19.2"

_applied = False


def needed() -> bool:
    return not torch.cuda.is_available()


def apply(seed: int) -> None:
    """Install every shim (idempotent) and seed megatron's RNG tracker on the CPU."""
    global _applied
    if not needed():
        raise RuntimeError("cpu_compat.apply() called on a machine with a GPU: the shims are for CPU runs only")
    if not _applied:
        _check_version()
        _patch_cuda_runtime()
        _patch_megatron()
        _CudaToCpu().__enter__()  # stays active for the life of the process
        _applied = True
    _install_rng_tracker(seed)


def _check_version() -> None:
    from importlib.metadata import version

    found = version("megatron-core")
    if found != MEGATRON_CORE_VERSION:
        raise RuntimeError(f"msa_megatron.cpu_compat targets megatron-core=={MEGATRON_CORE_VERSION}, found {found}")


class _NoOpEvent:
    def synchronize(self):
        pass

    def wait(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def query(self):
        return True


class _NoOpStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NoOpEvent()

    def synchronize(self):
        pass

    def __eq__(self, other):
        return isinstance(other, _NoOpStream)

    def __hash__(self):
        return 0


def _patch_cuda_runtime() -> None:
    # "the current CUDA device" becomes the CPU; streams/events/synchronize become no-ops.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = lambda *a, **k: _NoOpEvent()
    torch.cuda.current_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # gloo's all_to_all needs split sizes as host lists; megatron only converts CUDA tensors.
    def to_host(t, as_numpy=False, record_stream=False):
        if torch.is_tensor(t):
            t = t.cpu()
            return t.numpy() if as_numpy else t
        return t

    moe_utils.maybe_move_tensor_to_cpu = to_host
    token_dispatcher.maybe_move_tensor_to_cpu = to_host
    _patch_uneven_collectives()
    # Activation recompute saves/restores "the CUDA RNG state": use the CPU generator's.
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)


def _patch_uneven_collectives() -> None:
    """gloo has no all-gather / reduce-scatter with unequal sizes (alltoall dispatcher + EP + ETP):
    pad to the largest piece and trim; reduce the whole tensor and keep this rank's piece."""
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        width = max(output_split_sizes)
        padded = input_.new_zeros((width, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in range(group.size())]
        torch.distributed.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, output_split_sizes)])

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        torch.distributed.all_reduce(total, group=group)
        return torch.split(total, list(input_split_sizes), dim=0)[group.rank()].clone()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU and makes CPU tensors pass CUDA type checks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if (isinstance(device, (str, torch.device)) and str(device).startswith("cuda")) or type(device) is int:
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.to and len(args) > 1 and str(args[1]).startswith("cuda"):
            args = (args[0], "cpu") + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _install_rng_tracker(seed: int) -> None:
    """megatron's model-parallel RNG tracker on CPU generator states (replaces model_parallel_cuda_manual_seed)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRngTracker(mp_random.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    tracker = CpuRngTracker()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(
        mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
        seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank(),
    )
