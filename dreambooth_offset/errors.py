"""Errors a user can act on. The CLI prints each as one line, without a traceback: a UsageError
(bad input, found before or while starting) exits with code 2, a TrainingFailed with its
`exit_code` (1, or 128 + the signal number for an interrupted run)."""


from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class UsageError(Exception):
    """Bad input: a flag, a config key, a file or a folder. The message names what is at fault."""


class TrainingFailed(RuntimeError):
    """A run that started and could not finish; the message says what to do next."""

    exit_code = 1


class TrainingDiverged(TrainingFailed):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


class OutputFailed(TrainingFailed):
    """A file could not be written (a full disk, a vanished folder); the message names the path.
    The files written before it are intact."""


class TrainingInterrupted(TrainingFailed):
    """Stopped by SIGINT or SIGTERM after a finished step, with a checkpoint to resume from."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@contextmanager
def writing(folder: str | Path) -> Iterator[None]:
    """Turn a failed write (a full disk, a vanished folder) into OutputFailed naming the path."""
    try:
        yield
    except OSError as err:
        path = err.filename or folder
        raise OutputFailed(f"cannot write {path} ({err.strerror or err}); the files written before it are intact. "
                           "Free the space (or fix the folder) and run again (a training run: with "
                           "--resume_from_checkpoint latest)") from None
