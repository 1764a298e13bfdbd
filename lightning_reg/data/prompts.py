"""Prompt files for text-to-image sampling: one caption a line, sample ``i`` takes caption ``i`` (docs/text_to_image.md).

Lines end at ``\\n`` (or ``\\r\\n``) only, as an editor shows them: form feeds, ``\\x85`` or ``\\u2028`` inside a
line stay in its caption. A caption holds at most ``MAX_CAPTION_CHARS`` characters: CLIP's text encoder reads
77 tokens, a few hundred characters, so 2,000 is generous for any real caption, while tokenising a line of
megabytes takes gigabytes and minutes. The file holds at most ``MAX_PROMPTS`` lines and ``MAX_PROMPT_BYTES``.
"""

from __future__ import annotations

from pathlib import Path

from lightning_reg.errors import ConfigError
from lightning_reg.io.files import read_text

MAX_CAPTION_CHARS = 2_000
MAX_PROMPTS = 1_000_000
MAX_PROMPT_BYTES = 64 << 20


def read_prompts(path: str | Path, field: str = "--prompts") -> list[str]:
    """The captions of a UTF-8 text file, one a line (surrounding white space stripped); a ConfigError line
    for a missing, unreadable or oversized file, an empty one, blank lines (which would shift every later index)
    or a caption over ``MAX_CAPTION_CHARS``."""
    text = read_text(path, field, "caption file", MAX_PROMPT_BYTES)
    lines = text.removesuffix("\n").split("\n") if text else []
    if len(lines) > MAX_PROMPTS:
        raise ConfigError(f"{field} {path} has {len(lines):,} lines; at most {MAX_PROMPTS:,} captions are read: "
                          "split the file")
    prompts = [line.strip() for line in lines]
    if not any(prompts):
        raise ConfigError(f"{field} {path} is empty: give one caption a line")
    blank = [i + 1 for i, prompt in enumerate(prompts) if not prompt]
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (f" and {len(blank) - 5} more" if len(blank) > 5 else "")
        raise ConfigError(f"{field} {path}: line(s) {shown} are empty; give one caption a line, no blank lines "
                          "(sample i takes line i)")
    too_long = next(((i, len(p)) for i, p in enumerate(prompts, 1) if len(p) > MAX_CAPTION_CHARS), None)
    if too_long:
        raise ConfigError(f"{field} {path}: line {too_long[0]} has {too_long[1]:,} characters; a caption may have at "
                          f"most {MAX_CAPTION_CHARS:,} (CLIP reads 77 tokens): shorten it")
    return prompts
