"""One exception type for bad user input, so entry points can print one clear line for it (``distributed.fail``)."""

from argparse import ArgumentError


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


# Lines of jsonargparse's report on a ``class_path`` union that only restate the type, not the problem.
_UNION_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
                "Expected a <class 'NoneType'>")


def parse_error_message(err: ArgumentError) -> str:
    """jsonargparse's (often multi-line) parse error as one line that keeps the key and the problem."""
    lines = (line.strip().lstrip("- ") for line in str(err).splitlines())
    return " ".join(line for line in lines if line and not line.startswith(_UNION_NOISE))
