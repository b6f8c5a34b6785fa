"""The one exception type that reaches users as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data file, CLI flag, run directory).

    The CLI prints ``str(error)`` on one line and exits non-zero; everything else is a
    bug and keeps its traceback.
    """
