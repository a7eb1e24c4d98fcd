"""Key paths: how partialstore names a place in a PyTree, on disk and in messages.

A key path is a tuple of ``(kind, key)`` entries, one per level from the root:

============  =====================================  ===========================
kind          made from                              key
============  =====================================  ===========================
``"key"``     dict keys, ``jax.tree_util.DictKey``   ``str`` or ``int``
``"idx"``     list/tuple index, ``SequenceKey``      ``int`` >= 0
``"attr"``    NamedTuple/dataclass field, GetAttrKey ``str``
``"flat"``    ``FlattenedIndexKey`` (custom nodes)   ``int`` >= 0
============  =====================================  ===========================

The same structure always gives the same path, whether it comes from the state
being saved or from a load target, because both go through
:func:`entry_from_jax_key`. On disk a path is the JSON list
``[["key", "params"], ["idx", 0]]`` (:func:`encode_path` / :func:`decode_path`);
in messages it reads ``params/layers[0].mu`` (:func:`format_path`).

Selectors (:func:`parse_selector`) pick a subtree for a partial load:
``"params/layers/0"`` or ``("params", "layers", 0)``.

Example:
    >>> import json
    >>> path = (("key", "params"), ("idx", 0), ("attr", "mu"))
    >>> format_path(path)
    'params[0].mu'
    >>> decode_path(json.loads(json.dumps(encode_path(path)))) == path
    True
    >>> selector_matches(parse_selector("params/0"), path)
    True
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeAlias

import jax.tree_util as jtu

from partialstore.errors import CorruptCheckpointError, InvalidInputError

__all__ = [
    "ENTRY_KINDS",
    "MAX_DEPTH",
    "KeyPath",
    "PathEntry",
    "Selector",
    "check_str",
    "decode_path",
    "encode_path",
    "entry_from_jax_key",
    "format_path",
    "is_ancestor",
    "parse_selector",
    "path_keys",
    "selector_matches",
    "short_repr",
]

PathEntry: TypeAlias = tuple[str, str | int]
KeyPath: TypeAlias = tuple[PathEntry, ...]
# A parsed selector: one component per level. A component is a str or int key
# compared by value, or a full PathEntry compared exactly.
Selector: TypeAlias = tuple[Any, ...]

ENTRY_KINDS = frozenset({"key", "idx", "attr", "flat"})

#: The most entries a key path may have: a tree is at most this deep. Every
#: node and leaf record stores its full key path, so a record grows with the
#: square of the depth; the bound keeps a stored tree's size proportional to
#: its number of nodes and leaves, and is checked at save time
#: (:class:`~partialstore.errors.InvalidInputError`) and on every read
#: (:class:`~partialstore.errors.CorruptCheckpointError`). Real model trees
#: are a few dozen levels deep.
MAX_DEPTH = 256

# Dict keys are kept to the signed 64-bit range so that every JSON reader, not
# only Python's, reads the stored path back exactly.
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")
_INT_LIKE = re.compile(r"-?[0-9]+")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_str(text: str) -> str | None:
    """Return why ``text`` cannot be stored as UTF-8 JSON, or ``None`` if it can.

    Lone surrogates survive ``json.dumps`` with the default ASCII escaping but
    break any UTF-8 writer, so they are refused up front.

    Example:
        >>> check_str("ok") is None
        True
        >>> check_str("\\ud800")
        'contains a lone surrogate ...'
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate and cannot be encoded as UTF-8"
    return None


def _dict_key(key: Any, parent: KeyPath) -> str | int:
    """Validate a dict key and return it as a plain ``str`` or ``int``."""
    # bool is an int subclass but would come back from JSON as true/false.
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise InvalidInputError(
            f"Dict key {key!r} of type {type(key).__qualname__} under "
            f"{format_path(parent)!r} is not supported: dict keys must be str or int. "
            "Convert the key to str before saving."
        )
    if isinstance(key, str):
        reason = check_str(key)
        if reason is not None:
            raise InvalidInputError(f"Dict key {key!r} under {format_path(parent)!r} {reason}.")
        return str(key)
    if not _INT64_MIN <= key <= _INT64_MAX:
        raise InvalidInputError(
            f"Dict key {key} under {format_path(parent)!r} does not fit in a signed "
            "64-bit integer; use a str key instead."
        )
    return int(key)


def entry_from_jax_key(key: Any, parent: KeyPath) -> PathEntry:
    """Turn one ``jax.tree_util`` key entry into a :data:`PathEntry`.

    ``parent`` is the path of the node the key belongs to; it only serves
    error messages.

    Example:
        >>> import jax
        >>> entry_from_jax_key(jax.tree_util.DictKey("w"), ())
        ('key', 'w')

    Raises:
      InvalidInputError: the key is of a kind partialstore cannot store
        (a dict key that is neither str nor int, or a custom key class).
    """
    if isinstance(key, jtu.DictKey):
        return ("key", _dict_key(key.key, parent))
    if isinstance(key, jtu.SequenceKey):
        return ("idx", int(key.idx))
    if isinstance(key, jtu.GetAttrKey):
        name = key.name
        reason = check_str(name)
        if reason is not None:
            raise InvalidInputError(f"Field name {name!r} under {format_path(parent)!r} {reason}.")
        return ("attr", str(name))
    if isinstance(key, jtu.FlattenedIndexKey):
        return ("flat", int(key.key))
    raise InvalidInputError(
        f"The PyTree node at {format_path(parent)!r} uses a key of type "
        f"{type(key).__qualname__} ({key!r}); partialstore supports DictKey, SequenceKey, "
        "GetAttrKey and FlattenedIndexKey only."
    )


def encode_path(path: KeyPath) -> list[list[str | int]]:
    """Return the JSON form of a key path.

    Example:
        >>> encode_path((("key", "params"), ("idx", 0)))
        [['key', 'params'], ['idx', 0]]
    """
    return [[kind, key] for kind, key in path]


def _valid_entry(kind: Any, key: Any) -> bool:
    if not isinstance(kind, str) or kind not in ENTRY_KINDS or isinstance(key, bool):
        return False
    if kind == "key":
        return isinstance(key, str) or (isinstance(key, int) and _INT64_MIN <= key <= _INT64_MAX)
    if kind == "attr":
        return isinstance(key, str)
    return isinstance(key, int) and 0 <= key <= _INT64_MAX


def decode_path(obj: Any) -> KeyPath:
    """Inverse of :func:`encode_path`; validates what it reads.

    Example:
        >>> decode_path([["key", "params"], ["idx", 0]])
        (('key', 'params'), ('idx', 0))

    Raises:
      CorruptCheckpointError: ``obj`` is not a list of at most
        :data:`MAX_DEPTH` ``[kind, key]`` pairs with a known kind and a key
        of the right type.
    """
    if not isinstance(obj, list | tuple):
        raise CorruptCheckpointError(f"Stored key path {short_repr(obj)} is not a list.")
    if len(obj) > MAX_DEPTH:
        raise CorruptCheckpointError(
            f"Stored key path has {len(obj)} entries; a tree is at most {MAX_DEPTH} deep."
        )
    entries: list[PathEntry] = []
    for item in obj:
        # Fast path for the usual entry, a str dict key (manifests hold many).
        if type(item) is list and len(item) == 2 and item[0] == "key" and type(item[1]) is str:
            entries.append(("key", item[1]))
            continue
        if not isinstance(item, list | tuple) or len(item) != 2 or not _valid_entry(*item):
            raise CorruptCheckpointError(
                f"Stored key path {short_repr(obj)} has a malformed entry {short_repr(item)}; "
                'expected ["key", str|int64], ["idx", int>=0], ["attr", str] or ["flat", int>=0].'
            )
        entries.append((item[0], item[1]))
    return tuple(entries)


def short_repr(obj: Any, limit: int = 200) -> str:
    """``repr(obj)`` cut to about ``limit`` characters, for messages about stored data.

    Stored data may be huge or deeply nested; a message must stay readable
    and building it must not fail.

    Example:
        >>> short_repr(list(range(1000)), limit=20)
        '[0, 1, 2, 3, 4, 5, 6...(4890 chars)'
    """
    try:
        text = repr(obj)
    except (RecursionError, ValueError):  # deep nesting; ints past Python's digit limit
        return f"<a {type(obj).__name__} too deep or large to show>"
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _quote(text: str) -> str:
    # repr() escapes quotes, backslashes and control characters, so a quoted
    # key can never be mistaken for path syntax.
    return repr(text)


def format_path(path: KeyPath) -> str:
    """Return a readable, unambiguous form of a key path for messages.

    Dict keys are joined by ``/``; a str key that could be misread (empty,
    digits only, or holding anything beyond letters, digits, ``_`` and ``-``) is
    quoted, so the int key ``0`` reads ``0`` and the str key ``"0"`` reads
    ``'0'``. Sequence indices read ``[0]``, fields ``.mu``, flattened indices of
    custom nodes ``[#0]``; the root reads ``<root>``.

    Example:
        >>> format_path((("key", "opt"), ("idx", 0), ("attr", "mu"), ("key", "w")))
        'opt[0].mu/w'
    """
    if not path:
        return "<root>"
    parts: list[str] = []
    for kind, key in path:
        if kind == "key":
            if isinstance(key, int):
                text = str(key)
            elif _PLAIN_KEY.fullmatch(key) and not _INT_LIKE.fullmatch(key):
                text = key
            else:
                text = _quote(key)
            parts.append(f"/{text}" if parts else text)
        elif kind == "idx":
            parts.append(f"[{key}]")
        elif kind == "attr":
            name = str(key)
            parts.append(f".{name}" if _IDENTIFIER.fullmatch(name) else f".{_quote(name)}")
        elif kind == "flat":
            parts.append(f"[#{key}]")
        else:
            parts.append(f"<{kind}:{key!r}>")
    return "".join(parts)


def path_keys(path: KeyPath) -> tuple[str | int, ...]:
    """Return just the keys of a path, dropping their kinds.

    Useful to compare paths loosely, e.g. a NamedTuple field with a dict key.

    Example:
        >>> path_keys((("key", "opt"), ("attr", "mu")))
        ('opt', 'mu')
    """
    return tuple(key for _, key in path)


def is_ancestor(a: KeyPath, b: KeyPath) -> bool:
    """Return True if ``a`` is a proper prefix of ``b`` (``a`` is above ``b``).

    Example:
        >>> is_ancestor((("key", "p"),), (("key", "p"), ("idx", 0)))
        True
        >>> is_ancestor((("key", "p"),), (("key", "p"),))
        False
    """
    return len(a) < len(b) and b[: len(a)] == a


def _selector_component(item: Any, select: Any) -> Any:
    if isinstance(item, bool):
        raise InvalidInputError(
            f"Selector {select!r} holds the bool {item!r}; use str or int keys."
        )
    if isinstance(item, str | int):
        return item
    if isinstance(item, list | tuple) and len(item) == 2 and _valid_entry(*item):
        return (item[0], item[1])
    raise InvalidInputError(
        f"Selector {select!r} holds {item!r} of type {type(item).__qualname__}; each entry "
        'must be a str key, an int key/index, or a ("key"|"idx"|"attr"|"flat", key) pair.'
    )


def parse_selector(select: str | Sequence[Any]) -> Selector:
    """Parse a subtree selector.

    A string is split on ``/`` (``"params/layers/0"``; leading and trailing
    slashes are ignored, ``""`` or ``"/"`` selects the whole tree). A sequence
    holds one key per level: str, int, or an exact ``(kind, key)`` entry, so a
    :data:`KeyPath` is itself a valid selector. Use the sequence form for keys
    that contain ``/``.

    Example:
        >>> parse_selector("params/layers/0")
        ('params', 'layers', '0')
        >>> parse_selector(("params", "layers", 0))
        ('params', 'layers', 0)

    Raises:
      InvalidInputError: an empty component (``"a//b"``) or a key of an
        unsupported type.
    """
    if isinstance(select, str):
        stripped = select.strip("/")
        if not stripped:
            return ()
        parts = stripped.split("/")
        if any(part == "" for part in parts):
            raise InvalidInputError(
                f"Selector {select!r} has an empty component; write keys separated by single '/'."
            )
        return tuple(parts)
    if isinstance(select, bytes) or not isinstance(select, Sequence):
        raise InvalidInputError(
            f"Selector {select!r} of type {type(select).__qualname__} is not supported; pass a "
            "'/'-separated str or a tuple/list of keys."
        )
    return tuple(_selector_component(item, select) for item in select)


def _component_matches(component: Any, entry: PathEntry) -> bool:
    if isinstance(component, tuple):
        return component == entry
    key = entry[1]
    if type(component) is type(key):
        return bool(component == key)
    # A str selector "0" must find index 0 and an int selector must find the
    # dict key "0": users rarely know which container type a level is.
    return str(component) == str(key)


def selector_matches(selector: Selector, path: KeyPath, *, include_ancestors: bool = False) -> bool:
    """Return True if ``path`` lies in (or is) the subtree ``selector`` names.

    Keys are compared by value: ``0`` and ``"0"`` match an index, an int key or
    the str key ``"0"``; full ``(kind, key)`` entries match exactly. With
    ``include_ancestors=True`` the nodes above the selected subtree match too,
    which is what a loader needs to rebuild the containers around it.

    Example:
        >>> sel = parse_selector("params/0")
        >>> selector_matches(sel, (("key", "params"), ("idx", 0), ("key", "w")))
        True
        >>> selector_matches(sel, (("key", "params"),))
        False
        >>> selector_matches(sel, (("key", "params"),), include_ancestors=True)
        True
    """
    if len(path) < len(selector) and not include_ancestors:
        return False
    return all(_component_matches(c, e) for c, e in zip(selector, path, strict=False))
