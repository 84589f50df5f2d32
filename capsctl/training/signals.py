"""Stopping on SIGINT/SIGTERM at a step boundary, and the agreement between ranks on when to
stop or checkpoint."""

from __future__ import annotations

import atexit
import os
import signal
import socket
from pathlib import Path

import torch

from capsctl.distributed import Group, all_max


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing last.pt."""

    def __init__(self, signum: int, run_dir: Path, step: int):
        self.signum, self.run_dir, self.step = signum, run_dir, step
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; last.pt "
                         f"written. Resume with: capsctl train --resume {run_dir}")


class SignalStop:
    """First SIGINT/SIGTERM: remember it, let the current step finish. Second, of either kind:
    exit at once (checkpoints are only ever replaced by atomic rename, so nothing is torn).
    One exception, under torchrun (``under_agent``, default: $TORCHELASTIC_RUN_ID is set): a
    SIGTERM after a SIGINT is the agent passing on the Ctrl-C that already reached every
    worker, so it is not a second signal; a second SIGINT or SIGTERM still exits at once.

    Python runs a handler once for all the deliveries of a signal that come before it gets to
    run (two quick Ctrl-C while the main thread is inside one long C call), so the deliveries
    are counted on the wakeup fd, where the interpreter writes one byte per delivery."""

    def __init__(self, under_agent: bool | None = None):
        self.under_agent = ("TORCHELASTIC_RUN_ID" in os.environ if under_agent is None
                            else under_agent)
        self.received = None   # the first signal this process itself received (handler)
        self.signum = None     # the signal the loop acts on: set by agree_flags() at step
        #                        boundaries, the max over ranks under torchrun
        self._forwarded_seen = False
        self._old = {}
        self._wakeup = None    # (read socket, write socket, previous wakeup fd)

    def _deliveries(self, signum) -> int:
        """How many deliveries of ``signum`` this handler call stands for (at least one)."""
        n = 0
        if self._wakeup is not None:
            try:
                while data := self._wakeup[0].recv(4096):
                    n += data.count(signum)
            except OSError:  # drained (non-blocking read)
                pass
        return max(n, 1)

    def _handle(self, signum, frame):
        # a second signal exits at once; under torchrun a SIGTERM after a SIGINT is what the
        # agent sends its workers when Ctrl-C reached them all: let them finish and write the
        # checkpoint (a further signal after that one exits)
        forwarded = (self.under_agent and signum == signal.SIGTERM
                     and self.received == signal.SIGINT and not self._forwarded_seen)
        if self._deliveries(signum) > 1 or (self.received is not None and not forwarded):
            os._exit(128 + signum)
        if forwarded:
            self._forwarded_seen = True
            return
        self.received = self.received or signum

    def __enter__(self):
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        try:
            self._wakeup = (r, w, signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False))
        except ValueError:  # not in the main thread: count handler calls only
            r.close()
            w.close()
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
                # restart interrupted system calls (a collective's socket read under torchrun)
                # instead of failing them: the handler only sets a flag
                signal.siginterrupt(s, False)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc):
        if self.received is not None or self.signum is not None:  # stopping: a further signal
            # still means "exit at once" (a second one), or is ignored while we exit (torchrun);
            # once the interpreter shuts down, which resets a Python handler to the default
            # (death by the signal, not 128 + signum), the process is exiting anyway: ignore it
            atexit.register(_ignore_stop_signals)
            return
        for s, h in self._old.items():
            signal.signal(s, h)
        if self._wakeup is not None:
            r, w, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            r.close()
            w.close()
            self._wakeup = None


def _ignore_stop_signals() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def agree_flags(stop: SignalStop, group: Group, device: torch.device,
                by_time: bool = False) -> bool:
    """Set ``stop.signum`` to the signal the loop acts on now, and return whether the
    checkpoint clock has run out. Under torchrun a signal (or the clock) on any rank counts on
    every rank: all stop, or all checkpoint, after the same step."""
    received = stop.received  # read once: the handler may set it at any moment
    if group.enabled:  # every rank must take the same decision at the same step
        flags = all_max(torch.tensor([received or 0, int(by_time)], device=device),
                        group).tolist()
        received, by_time = flags[0] or None, bool(flags[1])
    stop.signum = received
    return by_time
