"""User-facing errors.

Anything a user can cause (a bad path, a broken checkpoint, a flag that does not fit) raises a
`DsvError` whose message is one line: what was found, what was expected, what to do. The CLI prints
it without a traceback; `--debug` shows the traceback.
"""


class DsvError(Exception):
    """An error caused by input, with a one-line actionable message."""


class ConfigError(DsvError):
    """config.json is missing, malformed, or describes an inconsistent model."""


class CheckpointError(DsvError):
    """The checkpoint on disk does not match what its index or config says."""


class BackendError(DsvError):
    """A backend is unknown or cannot run on this machine."""
