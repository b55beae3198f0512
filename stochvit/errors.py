"""The one exception type for user mistakes: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (paths, data, settings, checkpoints), not a bug."""
