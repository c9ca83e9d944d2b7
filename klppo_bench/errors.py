"""Errors the command line turns into a one-line message and a non-zero exit."""


class ConfigError(ValueError):
    """A bad configuration: the message names the source, the key and the allowed values."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameter; the run is recorded as failed."""
