"""One exception type for bad user input, so entry points can print one clear line for it."""


class ConfigError(ValueError):
    """Bad input (config value, CLI flag, checkpoint, dataset): the message names the field and the fix."""
