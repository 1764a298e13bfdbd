"""One exception type for bad user input, so entry points can print one clear line for it (``distributed.fail``)."""

import math
from argparse import ArgumentError
from pathlib import Path


class ConfigError(ValueError):
    """Bad input (config value, CLI flag, checkpoint, dataset): the message names the field and the fix."""


def check_names(names, allowed, field: str) -> tuple[str, ...]:
    """``names`` as a tuple, each one of ``allowed``; else a ConfigError naming ``field`` and the unknown ones."""
    names = tuple(names)
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ConfigError(f"{field}: unknown {unknown}; choose from {list(allowed)}")
    return names


def check_int(name: str, value, minimum: int = 1, optional: bool = False) -> int | None:
    """An integer (not a bool) ``>= minimum``, or ``None`` when ``optional``; else a ConfigError naming ``name``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {kind}{' or null' if optional else ''}, got {value!r}")
    return value


def check_number(name: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite number (not a bool) in ``[minimum, maximum]``, as a float; else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return float(value)


def does_not_exist(path) -> str:
    """``does not exist``, and for a relative ``path`` what it is relative to (the working directory)."""
    if Path(path).is_absolute():
        return "does not exist"
    return f"does not exist (relative to the working directory {Path.cwd()})"


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
