"""Prompt files for text-to-image sampling: one caption a line, sample ``i`` takes caption ``i`` (docs/text_to_image.md)."""

from __future__ import annotations

from pathlib import Path

from lightning_reg.errors import ConfigError


def read_prompts(path: str | Path, field: str = "--prompts") -> list[str]:
    """The captions of a UTF-8 text file, one a line (surrounding white space stripped); a ConfigError line
    for a missing or unreadable file, an empty one, or blank lines (which would shift every later index)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field} {path} {'is not a file' if path.exists() else 'does not exist'}: give a text "
                          "file with one caption a line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{field} {path} is not readable UTF-8 text ({type(err).__name__})") from None
    prompts = [line.strip() for line in lines]
    if not any(prompts):
        raise ConfigError(f"{field} {path} is empty: give one caption a line")
    blank = [i + 1 for i, prompt in enumerate(prompts) if not prompt]
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (f" and {len(blank) - 5} more" if len(blank) > 5 else "")
        raise ConfigError(f"{field} {path}: line(s) {shown} are empty; give one caption a line, no blank lines "
                          "(sample i takes line i)")
    return prompts
