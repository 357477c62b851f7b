"""Error messages that quote what the user gave, kept readable however long that was."""

from __future__ import annotations

import re

LONGEST_RUN = 120
LONGEST_MESSAGE = 2000


def _cut(text: str, keep: int) -> str:
    return f"{text[: keep * 3 // 4]}…[{len(text)} characters]…{text[-keep // 4 :]}"


def bounded(message: str) -> str:
    """`message` with each run of more than LONGEST_RUN non-space characters (a path, a quoted word) cut to its ends,
    naming its length, and the whole cut to LONGEST_MESSAGE characters the same way."""
    message = re.sub(rf"\S{{{LONGEST_RUN + 1},}}", lambda m: _cut(m.group(0), LONGEST_RUN), message)
    return message if len(message) <= LONGEST_MESSAGE else _cut(message, LONGEST_MESSAGE)
