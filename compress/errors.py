"""The two exceptions users see. Everything the library raises on bad input is one of these."""


class CompressError(Exception):
    """A problem with the model, a file or the training run that the user can fix."""


class ConfigError(CompressError, ValueError):
    """A recipe or argument that is not valid.

    The message names the JSON path, the bad value and what is allowed.
    """
