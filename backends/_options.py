"""Storage options that partialstore itself reads, shared by every backend.

Every backend accepts ``single_writer`` (bool, default False): the user's
promise that one writer uses the store. Backends with an atomic create keep
it only for uniformity; :class:`~partialstore.backends.fsspec.FsspecBackend`
relies on it to create without one. Backends without storage options of
their own (local disk, memory) reject anything else.

Example::

    options = dict(storage_options)
    single_writer = pop_single_writer(options)
    reject_options(options, "MemoryBackend", url)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from partialstore.errors import InvalidInputError

__all__ = ["pop_single_writer", "reject_options"]


def pop_single_writer(options: dict[str, Any]) -> bool:
    """Remove ``single_writer`` from ``options`` (a private copy) and return it.

    Raises:
      InvalidInputError: the value is not a bool (``"false"`` would be truthy).

    Example::

        options = dict(storage_options or {})
        backend.single_writer = pop_single_writer(options)
    """
    single_writer = options.pop("single_writer", False)
    if not isinstance(single_writer, bool):
        raise InvalidInputError(
            f"storage option single_writer must be a bool, got {single_writer!r}."
        )
    return single_writer


def reject_options(options: Mapping[str, Any], owner: str, url: str) -> None:
    """Raise if ``options`` (what is left after ``single_writer``) is not empty.

    Example::

        reject_options({}, "LocalBackend", "/tmp/ckpts")  # no error
    """
    if options:
        raise InvalidInputError(
            f"{owner} takes no storage options besides single_writer, got "
            f"{sorted(options)} for {url!r}."
        )
