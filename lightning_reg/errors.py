"""One exception type for bad user input, so entry points can print one clear line for it."""


class ConfigError(ValueError):
    """Bad input (config value, CLI flag, checkpoint, dataset): the message names the field and the fix."""


def one_line(err: BaseException, limit: int | None = 400) -> str:
    """``err``'s message with its white space folded, for quoting inside a one-line ``ConfigError``."""
    return " ".join(str(err).split())[:limit]
