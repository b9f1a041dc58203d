"""Errors a user can cause or fix: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """A problem with input or environment that the user can act on (no traceback shown)."""


class DatabaseUnavailable(UserError):
    """The database cannot be reached, started or used."""
