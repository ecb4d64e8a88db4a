"""Errors a user can act on. The CLI prints their message (which names the file/row/key and the fix)."""


class SftflowError(Exception):
    """Base for errors whose message is meant for the user, not a traceback."""


class DataError(SftflowError):
    """The input data cannot be used (missing file, bad rows, a failed expectation suite)."""


class StageError(SftflowError):
    """A stage cannot run with what it was given (missing upstream output, unloadable model...)."""
