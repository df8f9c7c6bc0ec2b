"""The one exception type that reaches the user as a single line (exit code 2)."""


class UserError(Exception):
    """A problem with the user's input, files or configuration, not a bug in nmt-tie.

    The command-line entry point prints the message on one line, without a traceback,
    and exits with status 2. Messages name the file (and line) and say what to change.
    """
