"""Preemption: SIGTERM and SIGINT (a cluster taking the machine back, Ctrl-C) stop a run at the
next step boundary (under torchrun on GPUs: the next check-in step, at most 20 steps on), on
every rank, once a checkpoint of that step is written."""
import contextlib
import os
import signal

import torch

import distributed


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum   # the shell's code for a process ended by that signal


@contextlib.contextmanager
def deferred_stop_signals():
    """While training runs, SIGTERM and SIGINT (a cluster preempting the job, Ctrl-C) only
    record themselves in the yielded list: the loop stops at the next step it checks, once a
    checkpoint of that step is on disk. A second signal while it saves changes nothing, nor
    one on the way out: once a signal has come, the process ignores them until it exits."""
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if received else handler)


def stop_signalled(received, device, check_in=True):
    """Whether a signal asked to stop; under torchrun, whether any rank got one (an all-reduce
    of one number), so that all ranks stop after the same step. Reading that number back waits
    for an accelerator's queued work, so there the ranks ask only at `check_in` steps (train.py:
    every CHECK_IN_EVERY steps, a second or so on a GPU); on the CPU at every step."""
    if distributed.world_size() == 1:
        return bool(received)
    if device.type != "cpu" and not check_in:
        return False
    return distributed.all_reduce_sum(
        torch.tensor(float(len(received)), device=device)).item() > 0


def stop_error(received, out, where):
    """The `Stopped` to raise once the checkpoint of the step `where` is written."""
    name = signal.Signals(received[0]).name if received else "a signal to another rank"
    return Stopped(f"stopped by {name} {where}; {os.path.join(out, 'checkpoint.pt')} holds it: "
                   f"python src/train.py --resume {out} continues",
                   received[0] if received else signal.SIGTERM)
