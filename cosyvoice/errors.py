"""Errors a caller can show to a user as they are: each message says what is wrong."""


class InputError(ValueError):
    """A request cannot be synthesised as given (empty text, unknown speaker, bad prompt, ...)."""


class ModelDirError(RuntimeError):
    """The model directory is missing something, or holds files that do not fit together."""
