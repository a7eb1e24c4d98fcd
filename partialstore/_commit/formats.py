"""The stored formats' names and versions, and a GC pause for decoding them.

The encoders (:mod:`partialstore._commit.txlog`,
:mod:`partialstore._commit.manifest`) and the checking decoder
(:mod:`partialstore._commit.records`) share these, so the decoder need not
import the modules that build on it.

Example:
    >>> import json
    >>> with paused_gc():
    ...     body = json.loads(b'{"format": "partialstore.log", "version": 1}')
    >>> body["format"] == LOG_FORMAT and body["version"] == LOG_VERSION
    True
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["LOG_FORMAT", "LOG_VERSION", "MANIFEST_FORMAT", "MANIFEST_VERSION", "paused_gc"]

LOG_FORMAT = "partialstore.log"
LOG_VERSION = 1
MANIFEST_FORMAT = "partialstore"
MANIFEST_VERSION = 1


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small objects.

    Merging 10^4 leaf entries allocates enough containers to trigger full
    collections, each of which walks every object of the process (JAX's
    included), which makes large merges several times slower (the figure is
    in benchmarks/README.md, "Figures behind code decisions"). The objects
    built here hold no cycles, so nothing is lost by waiting.

    Example:
        >>> import gc
        >>> with paused_gc():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
