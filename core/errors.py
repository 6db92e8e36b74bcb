"""Errors a user can cause and fix. The CLI prints them as one line and exits 2; the HTTP
server answers them with a 4xx. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A mistake in what the user gave us (a name, a path, a number, a setting)."""
