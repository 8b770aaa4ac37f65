"""Errors shared by every layer: a user's bad input is a `UserError`, reported as one clear line."""


class UserError(ValueError):
    """Bad input from a user or client: reported as one line, never a traceback."""


class CapacityError(UserError):
    """A request the KV budget cannot take (RESOURCE_EXHAUSTED in the API)."""
