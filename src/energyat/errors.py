"""User-facing errors: the CLI prints their one-line message and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad params, a missing or corrupt input file: something the user fixes, not a bug."""
