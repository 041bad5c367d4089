"""Redis glob patterns (``SCAN MATCH``, django-redis ``delete_pattern``): escaping a literal prefix."""

from __future__ import annotations

import re

_SPECIAL = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    """``text`` with Redis glob specials (``* ? [ ] \\``) escaped, to match it literally."""
    return _SPECIAL.sub(r"\\\1", text)
