"""The one exception type that reaches the user as a single line (exit code 2)."""


class UserError(Exception):
    """A problem with the user's input, files or configuration, not a bug in nmt-tie.

    The command-line entry point prints the message on one line, without a traceback,
    and exits with status 2. Messages name the file (and line) and say what to change.
    """

    label = "error"  # the word after the command's name: "nmt-tie train: error: ..."
    exit_status = 2
