"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input: a flag, a config key, a file or a folder. The message names what is at fault."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""
