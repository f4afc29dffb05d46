"""The one exception type users see: a clear, one-line message and a non-zero exit."""


class PlvmError(Exception):
    """A problem with the user's input or files, explained in one line.

    The CLI prints `error: <message>` and exits with status 1; anything else that escapes
    is a bug and keeps its traceback.
    """
