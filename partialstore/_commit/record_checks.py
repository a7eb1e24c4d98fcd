"""Low-level checks shared by the record and manifest decoders.

:mod:`partialstore._commit.records` decodes log records and manifests into
typed classes; the field checks they share live here so that module stays
about the types. A problem found inside an object raises :class:`Damage`,
which the decoder re-raises as
:class:`~partialstore.errors.CorruptCheckpointError` naming the object's key.

Example:
    >>> optional_str({"created": 5}, "created", "save 0")
    Traceback (most recent call last):
    partialstore._commit.record_checks.Damage: save 0: 'created' must be a string or null, got 5
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NoReturn

from partialstore._commit.formats import paused_gc
from partialstore._pytree.keypaths import KeyPath, decode_path, format_path, short_repr
from partialstore.errors import CorruptCheckpointError

__all__ = [
    "Damage",
    "check_layout",
    "fail",
    "json_list",
    "kind_of",
    "optional_object",
    "optional_str",
    "parse_versioned",
    "path_of",
    "save_id_of",
]


class Damage(Exception):
    """A problem found inside an object; re-raised with the object's key."""


def fail(where: str, why: str) -> Damage:
    """A :class:`Damage` for ``why``, prefixed with ``where`` inside the object."""
    return Damage(f"{where}: {why}" if where else why)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"the non-JSON constant {name} is not allowed")


def parse_versioned(
    what: str, data: bytes, *, fmt: str, version: int | tuple[int, ...]
) -> dict[str, Any]:
    """Parse a JSON object of format ``fmt`` and version ``version`` (or one of several).

    ``what`` names the object in errors.

    Example:
        >>> parse_versioned("Manifest x", b'{"format": "partialstore", "version": 1}',
        ...                 fmt="partialstore", version=1)
        {'format': 'partialstore', 'version': 1}
        >>> parse_versioned("Manifest x", b'{"format": "other"}', fmt="partialstore", version=1)
        Traceback (most recent call last):
        partialstore.errors.CorruptCheckpointError: Manifest x is not a partialstore object. ...

    Raises:
      CorruptCheckpointError: not UTF-8 JSON (or nested too deep, or holding
        NaN/Infinity or an int past Python's digit limit), another format, or
        another version.
    """
    try:
        with paused_gc():
            body = json.loads(data, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        why = "it is nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise CorruptCheckpointError(
            f"{what} is not valid JSON ({why}). The checkpoint is damaged."
        ) from None
    if not isinstance(body, dict) or body.get("format") != fmt:
        raise CorruptCheckpointError(f"{what} is not a {fmt} object. The checkpoint is damaged.")
    found = body.get("version")
    versions = version if isinstance(version, tuple) else (version,)
    # In Python true == 1, and an unhashable list or dict is never a version.
    if isinstance(found, bool) or not isinstance(found, int) or found not in versions:
        readable = " and ".join(str(v) for v in versions)
        raise CorruptCheckpointError(
            f"{what} has format version {short_repr(found, 40)}; this "
            f"partialstore reads version {readable}. Upgrade partialstore to read it."
        )
    return body


def optional_str(body: dict[str, Any], field: str, where: str) -> str | None:
    """``body[field]`` if it is a str or missing/null (then None); else :class:`Damage`."""
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise fail(where, f"{field!r} must be a string or null, got {short_repr(value, 60)}")
    return value


def optional_object(body: dict[str, Any], field: str, where: str) -> dict[str, Any] | None:
    """``body[field]`` if it is a JSON object or missing/null (then None); else :class:`Damage`."""
    value = body.get(field)
    if value is not None and not isinstance(value, dict):
        raise fail(where, f"{field!r} must be an object or null, got {short_repr(value, 60)}")
    return value


def json_list(body: dict[str, Any], field: str, where: str = "") -> list[Any]:
    """``body[field]``, which must be a list."""
    value = body.get(field)
    if not isinstance(value, list):
        raise fail(where, f"{field!r} must be a list, got {short_repr(value, 60)}")
    return value


def save_id_of(value: Any, where: str) -> str:
    """``value`` if it is a save id: one clean key segment, since it names ``data/<save_id>``."""
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\x00"):
        raise fail(where, f"save id {short_repr(value, 60)} is not a plain directory name")
    return value


def kind_of(body: dict[str, Any]) -> str | None:
    """``body["kind"]``, or None when it is not a str (a list or dict is unhashable)."""
    kind = body.get("kind")
    return kind if isinstance(kind, str) else None


def path_of(entry: Any, role: str, number: int) -> KeyPath:
    """The checked key path of entry ``number`` (a ``role``: node or leaf)."""
    if not isinstance(entry, dict):
        raise fail(f"{role} {number}", f"it is not a JSON object but {short_repr(entry, 60)}")
    try:
        return decode_path(entry.get("path"))
    except CorruptCheckpointError as error:
        raise fail(f"{role} {number}", str(error)) from None


def check_layout(entries_by_role: Iterable[tuple[str, Iterable[KeyPath]]]) -> None:
    """No path twice, and nothing under a leaf; linear in the total path length.

    ``entries_by_role`` gives the node paths (role ``"node"``) then the leaf
    paths (``"leaf"``). A trie of ``[role, children]`` slots is walked one
    entry per step, so a deep path costs its length, not the square of it.
    """
    root: list[Any] = [None, None]
    for role, paths in entries_by_role:
        for path in paths:
            slot = root
            for step in path:
                if slot[0] == "leaf":
                    raise fail(f"{role} {format_path(path)!r}", "it lies under a leaf")
                children = slot[1]
                if children is None:
                    children = slot[1] = {}
                child = children.get(step)
                if child is None:
                    child = children[step] = [None, None]
                slot = child
            if slot[0] is not None:
                why = f"the path is stored twice (also as a {slot[0]})"
                raise fail(f"{role} {format_path(path)!r}", why)
            if role == "leaf" and slot[1]:
                raise fail(f"{role} {format_path(path)!r}", "entries lie under this leaf")
            slot[0] = role
