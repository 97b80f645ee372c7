"""Signals: SIGTERM (a scheduler's preemption) and SIGINT stop a run the same way, and a rank
stuck in a collective when the launcher stops the job still records how the run ended."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Iterator

from .. import checkpoint as ckptmod
from .. import distributed as dist_utils
from ..errors import Interrupted

#: Called by the watchdog before it ends a process that cannot handle a signal itself.
abort_callbacks: list[Any] = []
#: Non-empty while :func:`run_pipeline` records how a failed run ended: a signal (the launcher's
#: SIGTERM to the ranks a failure left behind, say) must not cut that record short.
recording_end: list[bool] = []
#: Seconds a signalled process may take to stop by itself before the watchdog ends it (longer while
#: it is writing a checkpoint before stopping).
ABORT_GRACE_S = 3.0
CHECKPOINT_GRACE_S = 60.0


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (and SIGINT) raise :class:`Interrupted` in the main thread, so a
    scheduler's preemption is handled exactly like Ctrl-C.

    With several processes, a rank can be blocked inside a collective when the launcher stops the
    job (because another rank failed): Python runs signal handlers only between bytecodes, so the
    handler would wait forever. A watchdog thread hears the signal through the wakeup fd and, if the
    process has not stopped within ``ABORT_GRACE_S``, records the stop (``abort_callbacks``) and exits."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if recording_end:  # the run is stopping already; the watchdog still bounds how long it takes
            return
        # A loop that checkpoints on signals gets until its next step boundary (a second signal is final).
        if ckptmod.is_honoured() and ckptmod.request_stop(name):
            return
        raise Interrupted(name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    watchdog = None
    if dist_utils.world_size() > 1:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def watch() -> None:
            data = os.read(read_fd, 1)
            if not data:
                return
            # A checkpoint-before-stopping may take a while; a rank stuck in a collective does not, nor
            # one whose peer has died (NCCL waits on a dead peer instead of failing as gloo does): no
            # checkpoint, a collective, can complete then.
            checkpointing = ckptmod.is_honoured() and not dist_utils.ended_ranks()
            time.sleep(CHECKPOINT_GRACE_S if checkpointing else ABORT_GRACE_S)
            signame = signal.Signals(data[0]).name
            for callback in list(abort_callbacks):
                with contextlib.suppress(Exception):
                    callback(signame)
            reason = dist_utils.failure_elsewhere()
            why = f"stopped because {reason}" if reason else f"stopped by {signame} while waiting on other ranks"
            os.write(2, f"Error: [rank {dist_utils.rank()}] {why}\n".encode())
            os._exit(1)

        watchdog = threading.Thread(target=watch, daemon=True, name="rlhf-signal-watchdog")
        watchdog.start()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if watchdog is not None:
            signal.set_wakeup_fd(old_fd)
            os.close(write_fd)  # ends the watchdog's read
