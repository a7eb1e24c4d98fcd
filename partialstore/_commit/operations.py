"""One entry point per operation: the control flow behind each public function.

Each resolves the path to a :class:`~partialstore._commit.location.Location`
and runs the operation: the write operations (save, finalize, discard, gc)
go on the checkpoint's queue (:mod:`partialstore._runtime.ordering`) and, in
a multi-process JAX job, take a job-wide operation name in call order so
that every process takes part in the same one. :mod:`partialstore._api`
wraps these with argument handling and the user documentation.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = f"{tmp.name}/step_1"
    >>> start_save(path, {"step": 1}, None, None, copy=True, check_now=True).result()
    >>> finalize(path, None).operation  # each operation records its figures
    'finalize'
    >>> load(path, None, select=None, target=None)
    {'step': 1}
    >>> tmp.cleanup()
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import jax

from partialstore._commit import discarding, finalizing, loading, saving
from partialstore._commit.location import Location, job_wide_name, resolve
from partialstore._runtime import aio, multihost, ordering
from partialstore._runtime.ordering import AsyncResponse
from partialstore._runtime.stats import OperationStats, Recorder

__all__ = ["PathLike", "discard", "finalize", "gc", "load", "metadata", "start_save"]

PathLike = str | os.PathLike[str]
Options = Mapping[str, Any] | None


def queue_key(location: Location) -> Hashable:
    """The key of the checkpoint's queue in :mod:`partialstore._runtime.ordering`."""
    # The checkpoint's identity, not its spelling: "file:///x/ck" and "/x/ck"
    # must share one queue, or a finalize would not wait for a pending save.
    return location.key


def _collective_op(location: Location) -> str | None:
    """The job-wide name of this operation in a multi-process job (else None).

    Taken in call order, so every process of a JAX job names the same operation.
    """
    if not multihost.is_multiprocess():
        return None
    return multihost.next_op(job_wide_name(location.path))


def start_save(
    path: PathLike,
    state: Any,
    custom_metadata: Mapping[str, Any] | None,
    storage_options: Options,
    *,
    copy: bool,
    check_now: bool,
) -> AsyncResponse:
    """Validate and snapshot ``state``, then queue its save; return its response.

    ``copy`` copies the arrays (the caller may change them at once);
    ``check_now`` refuses a finalized checkpoint before returning instead of
    along with the array writes. Errors in the state or path raise here.
    """
    recorder = Recorder("save", os.fspath(path))
    location = resolve(path, storage_options)
    saving.check_writable(location)
    with recorder.phase("snapshot"):
        snap = saving.snapshot(state, custom_metadata, copy=copy)
        if check_now or multihost.is_multiprocess():  # every process of a JAX job checks first
            aio.run(saving.raise_if_finalized(location))
    recorder.add(nbytes=_array_bytes(snap), leaves=len(snap.leaves))
    op = _collective_op(location)
    if op is not None:  # every process takes part in each save, one save at a time

        async def commit_collective() -> None:
            with recorder.phase("commit"):
                await saving.commit_save(location, snap, op=op)
            recorder.finish()

        return _with_stats(ordering.schedule(queue_key(location), commit_collective), recorder)
    # Pipelined: the arrays are written as soon as the call is made, while
    # earlier saves to this path still write or commit; the log record still
    # goes in in call order.
    save_id = saving.new_save_id()

    async def write() -> saving.Descriptors:
        with recorder.phase("write"):
            return await saving.write_save_data(location, snap, save_id, check=not check_now)

    async def commit(written: Awaitable[saving.Descriptors]) -> None:
        with recorder.phase("commit"):
            await saving.commit_save(location, snap, save_id=save_id, written=written)
        recorder.finish()

    return _with_stats(ordering.schedule(queue_key(location), commit, prepare=write), recorder)


def _array_bytes(snap: saving.Snapshot) -> int:
    """Bytes of the arrays this process writes for ``snap``."""
    total = 0
    for leaf in snap.leaves:
        if leaf.array is not None:
            total += leaf.array.nbytes
        elif leaf.shards is not None:
            total += sum(data.nbytes for _, data in leaf.shards.shards)
    return total


def _with_stats(response: AsyncResponse, recorder: Recorder) -> AsyncResponse:
    response.attach_stats(lambda: recorder.stats)
    return response


def finalize(path: PathLike, storage_options: Options) -> OperationStats:
    """Wait for this process's pending saves to ``path``, then finalize it (on the primary)."""
    recorder = Recorder("finalize", os.fspath(path))
    location = resolve(path, storage_options)
    saving.check_writable(location)
    key = queue_key(location)
    op = _collective_op(location)

    async def run() -> None:
        recorder.phases["wait"] = recorder.elapsed()  # behind the saves queued before
        ordering.raise_unobserved_failures(key)
        with recorder.phase("finalize"):
            await multihost.run_on_primary(op, lambda: finalizing.finalize(location), "Finalize")

    ordering.schedule(key, run, track=False).result()
    return recorder.finish()


def discard(path: PathLike, storage_options: Options) -> None:
    """Discard the session at ``path`` (on the primary), after the saves queued before."""
    recorder = Recorder("discard", os.fspath(path))
    location = resolve(path, storage_options)
    op = _collective_op(location)

    async def run() -> None:
        with recorder.phase("discard"):
            await multihost.run_on_primary(op, lambda: discarding.discard(location), "Discard")

    ordering.schedule(queue_key(location), run, track=False).result()
    recorder.finish()


def gc(path: PathLike, storage_options: Options) -> list[str]:
    """Delete the unused data of the checkpoint at ``path`` (on the primary); return it."""
    recorder = Recorder("gc", os.fspath(path))
    location = resolve(path, storage_options)
    op = _collective_op(location)
    deleted: list[str] = []

    async def run() -> None:
        with recorder.phase("gc"):
            deleted.extend(
                await multihost.run_on_primary(op, lambda: discarding.gc(location), "gc")
            )

    # Queued like saves to the path, so it runs after those called before it.
    ordering.schedule(queue_key(location), run, track=False).result()
    recorder.finish()
    return deleted


def load(
    path: PathLike, storage_options: Options, *, select: Sequence[Any] | str | None, target: Any
) -> Any:
    """Read the finalized checkpoint at ``path``: into ``target``, or the ``select``-ed tree."""
    recorder = Recorder("load", os.fspath(path))
    location = resolve(path, storage_options)

    async def run() -> Any:
        with recorder.phase("manifest"):
            manifest = await loading.read_manifest(location)
        with recorder.phase("read"):
            if target is not None:
                return await loading.load_into_target(location, manifest, target)
            return await loading.load_tree(location, manifest, select=select)

    loaded = aio.run(run())
    leaves = list(_leaves(loaded))
    recorder.add(nbytes=sum(_nbytes(leaf) for leaf in leaves), leaves=len(leaves))
    recorder.finish()
    return loaded


def _leaves(tree: Any) -> Iterator[Any]:
    """The leaves of a loaded tree, walking dicts by hand: their keys may mix types."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
        return
    children = jax.tree_util.tree_leaves(tree, is_leaf=lambda node: isinstance(node, dict))
    if len(children) == 1 and children[0] is tree:
        yield tree
        return
    for child in children:
        yield from _leaves(child)


def _nbytes(leaf: Any) -> int:
    nbytes = getattr(leaf, "nbytes", 0)
    return nbytes if isinstance(nbytes, int) else 0


def metadata(path: PathLike, storage_options: Options) -> loading.CheckpointMetadata:
    """Describe the finalized checkpoint at ``path`` from its manifest alone."""
    location = resolve(path, storage_options)
    manifest = aio.run(loading.read_manifest(location))
    return loading.read_metadata(location, manifest)
