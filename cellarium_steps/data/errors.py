"""The one exception type for bad input: its message names the file and the field."""


class InputError(ValueError):
    """Input data or configuration that a step cannot use, found before or during a pass."""


class ConfigError(InputError):
    """A wrong key or value in --config, on the command line, or in a pipeline's keyword arguments."""
