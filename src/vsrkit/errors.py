"""The one exception type that reaches users as a one-line message."""


class VsrkitError(Exception):
    """A problem with the user's input (file, checkpoint, option) rather than a bug.

    The CLI prints ``vsrkit: error: <message>`` and exits non-zero without a traceback.
    """
