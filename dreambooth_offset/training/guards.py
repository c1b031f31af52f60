"""What guards a run while it trains: one run per output folder, and a clean stop on Ctrl-C / SIGTERM."""
from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dreambooth_offset.errors import UsageError

LOCK_NAME = ".dreambooth-offset.lock"


@contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an advisory lock (`flock`) on OUTPUT_DIR/.dreambooth-offset.lock for the whole run, so
    that a second run into the same folder refuses at start, naming the first. The kernel drops
    the lock when the process ends, kill -9 included, so a crashed run never leaves it stuck (the
    file it leaves behind is taken over by the next run)."""
    import fcntl

    fd = os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "another process"
            raise UsageError(f"--output_dir {output_dir}: another run is writing there ({holder}); wait for it "
                             "to end, or choose another --output_dir") from None
        f.truncate(0)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        f.flush()
        try:
            yield
        finally:
            os.unlink(output_dir / LOCK_NAME)  # still ours: a run that failed at start leaves the folder as it was
            fcntl.flock(f, fcntl.LOCK_UN)


class StopRequest:
    """Set by the first SIGINT or SIGTERM (the loop then finishes its step and checkpoints); a
    second one stops at once with KeyboardInterrupt."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


@contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """Route SIGINT and SIGTERM to a StopRequest while the block runs (main thread only: Python
    delivers signals there), and put the previous handlers back after it."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
