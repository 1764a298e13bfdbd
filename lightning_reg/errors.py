"""One exception type for bad user input, so entry points can print one clear line for it."""


class ConfigError(ValueError):
    """Bad input (config value, CLI flag, checkpoint, dataset): the message names the field and the fix."""


def check_names(names, allowed, field: str) -> tuple[str, ...]:
    """``names`` as a tuple, each one of ``allowed``; else a ConfigError naming ``field`` and the unknown ones."""
    names = tuple(names)
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ConfigError(f"{field}: unknown {unknown}; choose from {list(allowed)}")
    return names


def one_line(err: BaseException, limit: int | None = 400) -> str:
    """``err``'s message with its white space folded, for quoting inside a one-line ``ConfigError``."""
    return " ".join(str(err).split())[:limit]
