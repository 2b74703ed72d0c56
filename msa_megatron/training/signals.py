"""Stop cleanly on SIGTERM / SIGUSR1: save a checkpoint at the next step boundary, then exit.

Slurm sends SIGTERM on preemption, `scancel` and the time limit, and `--signal=USR1@lead` some
time before the limit (slurm/launch.sh forwards it to every task). Any rank may receive it; the
ranks agree with one all-reduce per step, so all of them save and leave together, and every rank
knows which signal it was and which rank got it first.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitRequest:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: Optional[str] = None  # on this rank
        self.reason: Optional[str] = None  # agreed by all ranks, e.g. "SIGTERM" or "SIGUSR1 to rank 3"
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name

    def agreed(self) -> Optional[str]:
        """The reason to stop when any rank has received a signal, else None (collective)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        signum = int(getattr(signal, self.received)) if self.received else 0
        # [signal number, world - rank]: the MAX names a signal and the lowest rank that got it.
        flags = torch.tensor([signum, world - rank if signum else 0], dtype=torch.int64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, by = (int(v) for v in flags.tolist())
        if not signum:
            return None
        name = signal.Signals(signum).name
        self.reason = name if world == 1 else f"{name} to rank {world - by}"
        return self.reason
