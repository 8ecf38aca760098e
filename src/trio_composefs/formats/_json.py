"""Parsing untrusted JSON (image metadata, ``meta.json``) with bounded nesting.

Sans-IO. The standard library's decoder recurses once per nesting level, so a
document of a few KiB of ``[`` ends in :class:`RecursionError`; here any nesting
deeper than :data:`MAX_DEPTH` (far more than any OCI or composefs document uses)
is a :class:`~trio_composefs.FormatError` naming the document, as is every
other decoding problem. The message never quotes the document's bytes.
"""

from __future__ import annotations

import json
from typing import Any, Final

from .._errors import FormatError

__all__ = ["MAX_DEPTH", "load_json", "load_json_object"]

#: The deepest nesting of arrays and objects accepted.
MAX_DEPTH: Final = 64


def _depth_exceeds(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests arrays/objects deeper than ``limit`` (iterative walk)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def load_json(data: bytes | str, *, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """Decode a JSON document of any type.

    Raises:
        FormatError: not UTF-8, not JSON, or nested deeper than ``max_depth``
            (``where`` names the document).
    """
    try:
        doc = json.loads(data)
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply (limit {max_depth})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{where}: not valid JSON ({exc})") from None
    if _depth_exceeds(doc, max_depth):
        raise FormatError(f"{where}: JSON nested too deeply (limit {max_depth})")
    return doc


def load_json_object(
    data: bytes | str, *, where: str, max_depth: int = MAX_DEPTH
) -> dict[str, Any]:
    """Like :func:`load_json`, and the document must be a JSON object."""
    doc = load_json(data, where=where, max_depth=max_depth)
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: not a JSON object")
    return doc
