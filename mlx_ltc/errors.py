class UserError(Exception):
    """Bad input or an impossible request: the CLI prints the message as one line and exits non-zero."""
