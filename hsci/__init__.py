"""hsci: config-driven deep-learning experiments."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem the user can fix: the message names it and says how, in one line."""
