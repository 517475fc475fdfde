"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""


class KdforgeError(Exception):
    """A problem with the user's input (config, file, name, shape), reported in one line."""


class ConfigError(KdforgeError):
    """A config file or override is invalid."""
