"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A mistake in what the user asked for (bad preset, missing file, mismatched scorer, ...)."""
