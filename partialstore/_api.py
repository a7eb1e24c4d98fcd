"""The public functions: save, save_async, finalize, load, metadata, discard, gc, verify.

Each handles its arguments and documents the operation; the control flow
(resolve the path, snapshot, queue per checkpoint, run collectively in a
multi-process job) is one entry point per operation in
:mod:`partialstore._commit.operations`. ``partialstore/__init__.py``
re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from partialstore._commit import loading, operations, targets, verifying
from partialstore._commit.location import resolve
from partialstore._commit.operations import PathLike
from partialstore._commit.verifying import VerifyReport
from partialstore._runtime import aio
from partialstore._runtime.ordering import AsyncResponse
from partialstore.errors import InvalidInputError

__all__ = ["discard", "finalize", "gc", "load", "metadata", "save", "save_async", "verify"]


def save_async(
    path: PathLike,
    state: Any,
    *,
    custom_metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> AsyncResponse:
    """Start a partial save of ``state`` into the session at ``path``; return at once.

    Before returning, the state is validated and snapshotted: device arrays
    are copied to host and numpy arrays are copied, so the caller may mutate
    or free them immediately. Saves to one path commit in call order, and
    :func:`finalize` waits for those still running; their array bytes are
    written at once, up to :data:`~partialstore._runtime.ordering.PIPELINE_DEPTH`
    saves per path at a time, while earlier saves commit.

    Example:
        >>> import numpy as np
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> opt = {"mu": np.zeros(3, np.float32)}
        >>> response = partialstore.save_async(f"{tmp.name}/step_10", {"opt_state": opt})
        >>> # ... keep training ...
        >>> response.result()  # None, or raises what the save raised
        >>> tmp.cleanup()

    Args:
      path: checkpoint path: a local path, ``os.PathLike`` or URL (``file://``,
        ``memory://``, ``s3://``, ``gs://``, any fsspec protocol).
      state: a PyTree of arrays and Python scalars (see :func:`save`).
      custom_metadata: a JSON dict merged into the checkpoint's metadata.
      storage_options: backend options (endpoint, credentials, ``single_writer``).

    Returns:
      An :class:`AsyncResponse`; ``result()`` blocks and re-raises the save's error.

    Raises:
      FileExistsError: a finalized checkpoint exists at ``path``
        (:class:`~partialstore.errors.CheckpointFinalizedError`).
      TypeError: a leaf cannot be saved (:class:`~partialstore.errors.UnsupportedLeafError`,
        naming the leaf's key path); nothing is written.
      ValueError: a bad path or ``custom_metadata``
        (:class:`~partialstore.errors.InvalidInputError`).
      NotImplementedError: the store has no atomic create and ``single_writer`` was not
        promised (:class:`~partialstore.errors.UnsupportedOperationError`).
    """
    return operations.start_save(
        path, state, custom_metadata, storage_options, copy=True, check_now=True
    )


def save(
    path: PathLike,
    state: Any,
    *,
    custom_metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Partially save ``state`` into the session at ``path`` and wait until it is committed.

    The first save starts a session; each later save adds keys to it or
    replaces them. Nothing is visible at ``path`` until :func:`finalize`.
    A save is atomic: killed at any instant, it is either wholly in the
    session or not at all.

    Workflow::

        path = "s3://bucket/run/step_100"
        partialstore.save(path, {"params": params, "step": 100})
        partialstore.save(path, {"opt_state": opt_state}, custom_metadata={"lr": 3e-4})
        partialstore.finalize(path)           # publishes atomically; moves no array byte
        restored = partialstore.load(path)

    Additions and replacements (applied in commit order at finalize):

    - a key not saved before is added;
    - a key saved before is replaced: a later leaf replaces an earlier leaf
      or whole subtree at the same key path, and a later subtree replaces an
      earlier leaf; subtrees of the same container kind merge key by key;
    - ``custom_metadata`` dicts merge key by key (nested dicts too), later
      values winning.

    Leaves may be ``jax.Array``, ``np.ndarray`` (every numeric dtype, bool and the
    ml_dtypes kinds such as bfloat16 and float8), numpy scalars, Python ``int``,
    ``float``, ``bool``, ``str`` and ``None``; containers are dicts, lists,
    tuples, NamedTuples and registered pytree nodes, empty ones included.

    In a multi-process JAX job (``jax.distributed`` initialized), every
    process calls ``save`` with the same global tree, path and order: each
    writes only the shards of global ``jax.Array`` leaves that it owns, the
    primary process writes everything else and commits, and all return (or
    raise) together. :func:`finalize` is then called by every process too.

    Args, Raises: as :func:`save_async`, and whatever the save itself raised
    (e.g. :class:`~partialstore.errors.CheckpointFinalizedError` if a concurrent
    finalize sealed the session first: the save is then not in the checkpoint).
    """
    # The caller waits, so its arrays cannot change under us: skip the copy.
    # It learns of a finalized checkpoint when the save returns either way,
    # so the check goes along with the array writes instead of before them.
    operations.start_save(
        path, state, custom_metadata, storage_options, copy=False, check_now=False
    ).result()


def finalize(path: PathLike, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Publish the partial-save session at ``path`` as one finalized checkpoint.

    Waits for this process's pending saves to ``path``, seals the session's
    log (saves that commit later fail with ``FileExistsError``), merges the
    saves into a manifest and publishes it: by an atomic rename where the
    store has one, by an exclusive create of ``<path>/partialstore.json``
    where it has not. No array byte is copied or moved, so finalize costs the
    same for 1 MB or 1 TB. Killed at any instant, running it again completes
    the same checkpoint. In a multi-process JAX job every process calls it;
    the primary finalizes and the others wait and return or raise as it did.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> path = f"{tmp.name}/step_10"
        >>> partialstore.save(path, {"step": 1})
        >>> partialstore.finalize(path)
        >>> partialstore.finalize(path)
        Traceback (most recent call last):
        partialstore.errors.CheckpointFinalizedError: ...
        >>> tmp.cleanup()

    Raises:
      FileExistsError: a finalized checkpoint exists at ``path`` (also for all but
        one of several concurrent finalizers).
      FileNotFoundError: there is no partial save session at ``path``.
      partialstore._runtime.ordering.UnobservedSaveError: an earlier ``save_async`` to ``path``
        failed and its result was never read; nothing was finalized.
    """
    operations.finalize(path, storage_options)


def load(
    path: PathLike,
    target: Any = None,
    *,
    select: Sequence[Any] | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load a finalized checkpoint: the whole tree, selected subtrees, or a target layout.

    Example:
        >>> import numpy as np
        >>> import jax
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> path = f"{tmp.name}/step_10"
        >>> partialstore.save(path, {"params": {"w": np.ones(3, np.float32)}, "step": 10})
        >>> partialstore.finalize(path)
        >>> partialstore.load(path)  # numpy arrays
        {'params': {'w': array([1., 1., 1.], dtype=float32)}, 'step': 10}
        >>> partialstore.load(path, select=["params"])  # only these bytes are read
        {'params': {'w': array([1., 1., 1.], dtype=float32)}}
        >>> device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        >>> abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=device)}
        >>> partialstore.load(path, {"params": abstract})  # jax.Arrays, placed
        {'params': {'w': Array([1., 1., 1.], dtype=float32)}}
        >>> with jax.set_mesh(jax.make_mesh((1,), ("x",))):  # nnx.eval_shape's AbstractMesh
        ...     abstract = jax.eval_shape(lambda: jax.numpy.ones(3, np.float32))
        ...     partialstore.load(path, {"params": {"w": abstract}})
        {'params': {'w': Array([1., 1., 1.], dtype=float32)}}
        >>> tmp.cleanup()

    Args:
      path: the checkpoint path.
      select: key paths of the subtrees to read: ``"params/dense/0"``-style strings
        or tuples of keys such as ``("params", "dense", 0)``. Other leaves are not read.
      target: a PyTree (positional or keyword) whose leaves say what to return: a
        ``jax.Array`` or ``jax.ShapeDtypeStruct`` gives a ``jax.Array`` with its
        sharding (an ``AbstractMesh`` resolved against ``jax.set_mesh``'s mesh; none:
        where ``jnp.asarray`` puts it), each device's shard read by itself; numpy arrays come
        back as numpy, other leaves as stored. The result has the target's structure.
      storage_options: backend options.

    Returns:
      Without ``target``: dicts, lists and tuples rebuilt as saved, arrays as
      numpy arrays, scalars as the Python type saved.

    Raises:
      FileNotFoundError: no finalized checkpoint at ``path``, or ``select``/``target``
        names a key it does not hold.
      ValueError: a target shape differs from the stored one, a target sharding is
        over an ``AbstractMesh`` with no matching ``jax.set_mesh`` mesh, or the
        manifest is corrupt or points outside the checkpoint.
    """
    if select is not None and target is not None:
        raise InvalidInputError("Pass either select or target to load, not both.")
    if target is not None:  # here: jax.set_mesh is in effect in the caller's thread only
        target = targets.resolve_target(target)
    return operations.load(path, storage_options, select=select, target=target)


def metadata(
    path: PathLike, *, storage_options: Mapping[str, Any] | None = None
) -> loading.CheckpointMetadata:
    """Describe a finalized checkpoint without reading array bytes.

    ``info.tree`` has the checkpoint's structure with a
    :class:`~partialstore.LeafMetadata` at every leaf: its kind, shape, dtype
    and ``sharding``, the :class:`~partialstore.SavedSharding` (mesh shape,
    axis names, partition spec) a ``jax.Array`` was saved with, or ``None``
    (one device, numpy, inline values, older writers).
    ``info.abstract_tree()`` turns it into a load target that restores the
    saved layout: ``load(path, info.abstract_tree())`` gives each such
    ``jax.Array`` back with its saved ``NamedSharding`` on this job's
    devices, and ``info.abstract_tree(mesh=...)`` with the saved partition
    specs on another mesh (:meth:`~partialstore.CheckpointMetadata.abstract_tree`).

    Example:
        >>> import numpy as np
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> path = f"{tmp.name}/step_10"
        >>> w = np.zeros((1024, 1024), np.float32)
        >>> partialstore.save(path, {"params": {"w": w}}, custom_metadata={"step": 10})
        >>> partialstore.finalize(path)
        >>> info = partialstore.metadata(path)
        >>> info.tree["params"]["w"]
        LeafMetadata(kind='array', shape=(1024, 1024), dtype='float32')
        >>> info.tree["params"]["w"].sharding is None  # numpy: no sharding saved
        True
        >>> info.custom_metadata, len(info.saves)
        ({'step': 10}, 1)
        >>> type(partialstore.load(path, info.abstract_tree())["params"]["w"])
        <class 'numpy.ndarray'>
        >>> tmp.cleanup()

    Raises:
      FileNotFoundError: no finalized checkpoint at ``path``.
    """
    return operations.metadata(path, storage_options)


def discard(path: PathLike, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Abandon the unfinalized session at ``path`` and delete its data.

    Example:
        >>> import numpy as np
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> path = f"{tmp.name}/step_10"
        >>> partialstore.save(path, {"broken": np.ones(3)})
        >>> partialstore.discard(path)  # as if nothing had been saved
        >>> partialstore.finalize(path)
        Traceback (most recent call last):
        partialstore.errors.NotFoundError: No partial save session at ...
        >>> tmp.cleanup()

    In a multi-process JAX job every process calls it: the primary discards,
    the others wait and return or raise as it did.

    Raises:
      FileExistsError: ``path`` is finalized (discard never deletes a checkpoint).
      FileNotFoundError: there is no session at ``path``.
    """
    operations.discard(path, storage_options)


def gc(path: PathLike, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete data in a finalized checkpoint that its manifest does not use.

    Saves that were killed, lost to the seal, or wholly replaced leave such
    data behind. Returns the deleted directories, relative to ``path``.

    Example:
        >>> import numpy as np
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> path = f"{tmp.name}/step_10"
        >>> partialstore.save(path, {"w": np.zeros(3)})
        >>> partialstore.save(path, {"w": np.ones(3)})  # wholly replaces the first save
        >>> partialstore.finalize(path)
        >>> partialstore.gc(path)  # the first save's data
        ['data/...']
        >>> partialstore.gc(path)
        []
        >>> tmp.cleanup()

    In a multi-process JAX job every process calls it: the primary deletes,
    the others wait and return the same list (or raise as it did).

    Raises:
      FileNotFoundError: no finalized checkpoint at ``path``.
    """
    return operations.gc(path, storage_options)


def verify(
    path: PathLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Read every byte of the finalized checkpoint at ``path`` and check every checksum.

    Packed leaves are checked against their CRC-32C, zarr3 chunks against
    their ``crc32c`` codec; every chunk must exist and decode, and every
    array's ``zarr.json`` must match the manifest. A damaged leaf does not
    stop verification: the report names every one. Nothing is written.

    Example:
        >>> import numpy as np
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> path = f"{tmp.name}/step_10"
        >>> partialstore.save(path, {"params": {"w": np.ones(3, np.float32)}, "step": 10})
        >>> partialstore.finalize(path)
        >>> report = partialstore.verify(path)
        >>> report.ok, report.arrays, report.damaged
        (True, 1, [])
        >>> tmp.cleanup()

    Args:
      path: the checkpoint path.
      storage_options: backend options.
      progress: called with ``(bytes checked, bytes in all)`` as leaves finish
        (from partialstore's I/O thread).

    Returns:
      A :class:`~partialstore._commit.verifying.VerifyReport`; ``report.ok`` is
      True when every byte matched, else ``report.damaged`` lists each damaged
      leaf's key path and why.

    Raises:
      FileNotFoundError: no finalized checkpoint at ``path``.
      ValueError: the manifest itself is damaged
        (:class:`~partialstore.errors.CorruptCheckpointError`).
      OSError: the store failed (:class:`~partialstore.errors.BackendError`).
    """
    location = resolve(path, storage_options)
    return aio.run(verifying.verify_checkpoint(location, progress))
