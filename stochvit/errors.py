"""The one exception type for user mistakes: the CLI prints its message and exits with status 2."""


class UserError(ValueError):
    """A problem with the user's input (paths, data, settings, checkpoints), not a bug.

    A `ValueError`, so that Python callers of the library catch it the usual way.
    """
