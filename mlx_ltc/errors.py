class UserError(Exception):
    """Bad input or an impossible request: the CLI prints the message as one line and exits non-zero."""


class Interrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved and the run can be resumed."""
