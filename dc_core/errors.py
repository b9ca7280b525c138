"""The errors that end a command with one line for the user instead of a traceback."""


class ConfigError(ValueError):
    """A flag value no run can use; the message names the flag, the value and the fix."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset named by --dataset is not where it was looked for; the message says how to
    get it."""
