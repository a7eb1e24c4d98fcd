"""The stored formats' names and versions, and a GC pause for decoding them.

The encoders (:mod:`partialstore._commit.txlog`,
:mod:`partialstore._commit.manifest`) and the checking decoder
(:mod:`partialstore._commit.records`) share these, so the decoder need not
import the modules that build on it.

Example:
    >>> import json
    >>> with paused_gc():
    ...     body = json.loads(b'{"format": "partialstore.log", "version": 1}')
    >>> body["format"] == LOG_FORMAT and body["version"] in LOG_VERSIONS_READ
    True
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = [
    "LOG_FORMAT",
    "LOG_VERSION",
    "LOG_VERSIONS_READ",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "SEGMENTED_FROM_VERSION",
    "paused_gc",
]

LOG_FORMAT = "partialstore.log"
#: The version of the log records this partialstore writes in a new log.
#: Version 2 added one rule to version 1: a finalize writes the log's seal
#: notice before its seal, so a save that sees no notice knows no seal is
#: there without reading a record (docs/protocol.md, "Seal notices"). A
#: version-1 reader refuses version-2 records, which is what keeps a
#: version-1 finalizer, which writes no notice, out of a log where saves rely
#: on it. Version 3 keeps records from number ``logread.segment()`` on in
#: folders (docs/protocol.md, "Log version 3"); a log begun in an older
#: version goes on in that version (records of version 2 after version 2).
LOG_VERSION = 3
#: The first version whose logs keep records in folders.
SEGMENTED_FROM_VERSION = 3
#: The log record versions this partialstore reads (older logs still load).
LOG_VERSIONS_READ = (1, 2, 3)
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
