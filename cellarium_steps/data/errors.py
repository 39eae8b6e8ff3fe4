"""The one exception type for bad input: its message names the file and the field."""


class InputError(ValueError):
    """Input data or configuration that a step cannot use, found before or during a pass."""
