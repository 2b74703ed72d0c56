"""Stop cleanly on SIGTERM / SIGUSR1: save a checkpoint at the next step boundary, then exit.

Slurm sends SIGTERM on preemption, `scancel` and the time limit, and `--signal=USR1@lead` some
time before the limit. Any rank may receive it; the ranks agree with one all-reduce per step so
that all of them save and leave together.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitRequest:
    def __init__(self, device: torch.device):
        self.device = device
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank when any rank has received a signal (collective)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
