"""The one exception type users see: its message is printed as a single line by the CLI."""


class DiffuseError(Exception):
    """A problem with the user's input or environment, explained in one line.

    Raised for bad flags, missing or corrupt files, incompatible checkpoints and the like. The CLI
    prints ``error: <message>`` and exits non-zero, without a traceback unless ``--debug``.
    """
