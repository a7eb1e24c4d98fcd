"""An Orbax v1 drop-in: ``from partialstore import orbax as ocp`` for Orbax's ``v1 as ocp``.

Orbax's partial-saving calls keep their names and signatures
(``orbax.checkpoint.v1.partial.save / save_async / finalize`` and
``orbax.checkpoint.v1.load``, as of orbax-checkpoint 0.12), so code written
for Orbax switches by changing one import::

    from partialstore import orbax as ocp

    ocp.partial.save(path, {"params": params, "step": 1})
    ocp.partial.save(path, {"opt_state": opt_state})
    ocp.partial.finalize(path)
    restored = ocp.load(path, abstract_state)

Storage options (endpoints, credentials) cannot be passed through Orbax's
signatures: give them once with :func:`partialstore.configure_storage`, or
through the environment (``AWS_ENDPOINT_URL``, application default
credentials, ...). The remaining differences from released Orbax are listed
in the README ("Switching from Orbax"): later saves may replace earlier keys,
an empty first save is accepted, the layout differs (on object stores
there is no ``<path>.partial_save``; the files are partialstore's, not
Orbax's, so neither library reads the other's checkpoints), and ``load(path)``
restores the saved shardings only where they were recorded and fit this
job's devices (numpy otherwise).

As in Orbax, ``finalize`` accepts the session's spelling
``<path>.partial_save`` as well as ``<path>``; here ``save`` and
``save_async`` accept it too (it names the same session).

Example:
    >>> import numpy as np
    >>> import tempfile
    >>> from partialstore import orbax as ocp
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = f"{tmp.name}/ckpt"
    >>> ocp.partial.save(path, {"params": {"layer0": np.arange(3)}, "step": 1})
    >>> ocp.partial.save(path, {"params": {"layer1": np.ones(2)}})
    >>> ocp.partial.finalize(path + ".partial_save")  # Orbax's other spelling
    >>> ocp.load(path)
    {'params': {'layer0': array([0, 1, 2]), 'layer1': array([1., 1.])}, 'step': 1}
    >>> tmp.cleanup()
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from partialstore import _api
from partialstore._commit.loading import LeafMetadata
from partialstore._commit.location import STAGING_SUFFIX
from partialstore._commit.operations import PathLike
from partialstore._runtime.ordering import AsyncResponse
from partialstore.errors import InvalidInputError, NotFoundError

__all__ = [
    "AUTO_CHECKPOINTABLE_KEY",
    "PARTIAL_SAVE_SUFFIX",
    "STATE_CHECKPOINTABLE_KEY",
    "finalize",
    "load",
    "load_pytree",
    "partial",
    "save",
    "save_async",
]

#: Orbax's suffix of a partial-save session (``orbax...partial.path.PARTIAL_SAVE_SUFFIX``).
PARTIAL_SAVE_SUFFIX = STAGING_SUFFIX
#: ``checkpointable_name`` values that name the one PyTree a checkpoint holds:
#: Orbax's defaults, its partial saves' name (``state``) and its older one.
AUTO_CHECKPOINTABLE_KEY = "AUTO"
STATE_CHECKPOINTABLE_KEY = "state"
_PYTREE_NAMES = (AUTO_CHECKPOINTABLE_KEY, STATE_CHECKPOINTABLE_KEY, "pytree", None)


def _final_path(path: PathLike) -> PathLike:
    """``path`` without a trailing ``.partial_save`` (Orbax's name for the session)."""
    if not isinstance(path, str | os.PathLike):
        return path  # the core says what is wrong with it
    text = os.fspath(path).rstrip("/")
    if text.endswith(PARTIAL_SAVE_SUFFIX) and len(text) > len(PARTIAL_SAVE_SUFFIX):
        return text[: -len(PARTIAL_SAVE_SUFFIX)]
    return path


def save_async(
    path: PathLike, state: Any, *, custom_metadata: dict[str, Any] | None = None
) -> AsyncResponse:
    """``orbax.checkpoint.v1.partial.save_async``: start a partial save; return at once.

    Later saves may replace keys of earlier ones (Orbax raises); see
    :func:`partialstore.save_async` for everything else.

    Example:
        >>> import tempfile
        >>> from partialstore import orbax as ocp
        >>> tmp = tempfile.TemporaryDirectory()
        >>> ocp.partial.save_async(f"{tmp.name}/ckpt", {"step": 1}).result()
        >>> tmp.cleanup()

    Raises:
      FileExistsError: a finalized checkpoint exists at ``path``.
    """
    return _api.save_async(_final_path(path), state, custom_metadata=custom_metadata)


def save(path: PathLike, state: Any, *, custom_metadata: dict[str, Any] | None = None) -> None:
    """``orbax.checkpoint.v1.partial.save``: partially save ``state`` and wait for it.

    Example:
        >>> import tempfile
        >>> from partialstore import orbax as ocp
        >>> tmp = tempfile.TemporaryDirectory()
        >>> ocp.partial.save(f"{tmp.name}/ckpt", {"step": 1}, custom_metadata={"lr": 0.1})
        >>> tmp.cleanup()

    Raises:
      FileExistsError: a finalized checkpoint exists at ``path``.
    """
    _api.save(_final_path(path), state, custom_metadata=custom_metadata)


def finalize(path: PathLike) -> None:
    """``orbax.checkpoint.v1.partial.finalize``: publish the session at ``path``.

    ``path`` is the checkpoint's path or, as in Orbax, the session's
    ``<path>.partial_save``.

    Example:
        >>> import tempfile
        >>> from partialstore import orbax as ocp
        >>> tmp = tempfile.TemporaryDirectory()
        >>> ocp.partial.save(f"{tmp.name}/ckpt", {"step": 1})
        >>> ocp.partial.finalize(f"{tmp.name}/ckpt")
        >>> tmp.cleanup()

    Raises:
      FileExistsError: a finalized checkpoint exists at ``path``.
      FileNotFoundError: there is no partial save session at ``path``.
    """
    _api.finalize(_final_path(path))


def load(
    path: PathLike,
    abstract_state: Any = None,
    *,
    checkpointable_name: str | None = AUTO_CHECKPOINTABLE_KEY,
) -> Any:
    """``orbax.checkpoint.v1.load``: load the finalized checkpoint at ``path``.

    With ``abstract_state``, the result has its structure and each leaf is
    placed as the abstract leaf says (``jax.ShapeDtypeStruct`` and
    ``jax.Array`` leaves give ``jax.Array``; a sharding over an
    ``AbstractMesh`` is resolved against the mesh of ``jax.set_mesh``, as
    Orbax does); only the leaves it names are read.

    Without it, the tree comes back as :func:`partialstore.load` gives it
    (dicts, lists and tuples as saved; NamedTuples and other nodes as
    dicts), and, as in Orbax, in the saved layout when the checkpoint
    recorded shardings: each ``jax.Array`` saved with a ``NamedSharding``
    comes back with it, on a mesh of this job's devices like the saved one
    (:meth:`partialstore.CheckpointMetadata.abstract_tree`), other saved
    ``jax.Array`` leaves on the default device, numpy arrays as numpy. When
    no sharding was recorded (arrays saved from one device, or an older
    writer), or a saved mesh needs more devices than this job has, every
    array comes back as numpy, as :func:`partialstore.load` gives it.

    Example:
        >>> import jax
        >>> import numpy as np
        >>> import tempfile
        >>> from partialstore import orbax as ocp
        >>> tmp = tempfile.TemporaryDirectory()
        >>> ocp.partial.save(f"{tmp.name}/ckpt", {"a": np.arange(3.0)})
        >>> ocp.partial.finalize(f"{tmp.name}/ckpt")
        >>> ocp.load(f"{tmp.name}/ckpt", jax.eval_shape(lambda: {"a": jax.numpy.zeros(3)}))
        {'a': Array([0., 1., 2.], dtype=float32)}
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        >>> ocp.partial.save(f"{tmp.name}/sharded", {"w": jax.device_put(np.arange(2.0), sharding)})
        >>> ocp.partial.finalize(f"{tmp.name}/sharded")
        >>> ocp.load(f"{tmp.name}/sharded")["w"].sharding == sharding  # the saved layout
        True
        >>> tmp.cleanup()

    Args:
      path: the checkpoint path.
      abstract_state: the tree to load into, or ``None`` to load everything.
      checkpointable_name: ``"AUTO"``, ``"state"``, ``"pytree"`` or ``None``: a
        partialstore checkpoint holds one PyTree, which all of these name.

    Raises:
      FileNotFoundError: no finalized checkpoint at ``path``, or another
        ``checkpointable_name``.
    """
    _check_checkpointable_name(path, checkpointable_name)
    if abstract_state is not None:
        return _api.load(path, abstract_state)
    return _load_saved_layout(path)


def _check_checkpointable_name(path: PathLike, name: Any) -> None:
    """Refuse a ``checkpointable_name`` other than those naming the one PyTree."""
    if name in _PYTREE_NAMES:
        return
    if not isinstance(name, str):
        raise InvalidInputError(f"checkpointable_name must be a str or None, got {name!r}.")
    raise NotFoundError(
        f"A partialstore checkpoint holds one PyTree, named {STATE_CHECKPOINTABLE_KEY!r}; "
        f"there is no checkpointable {name!r} at {os.fspath(path)}. Pass "
        f"checkpointable_name={AUTO_CHECKPOINTABLE_KEY!r} (the default)."
    )


def _load_saved_layout(path: PathLike) -> Any:
    """The whole checkpoint as ``partialstore.load(path)`` gives it, arrays in the saved layout.

    Falls back to ``partialstore.load(path)`` (numpy) when no leaf recorded
    a sharding, or when a saved mesh does not fit this job's devices.
    """
    info = _api.metadata(path)
    if not any(leaf.sharding is not None for leaf in _leaf_metadata(info.tree)):
        return _api.load(path)
    try:
        abstract = info.abstract_tree()
    except InvalidInputError:  # a saved mesh needs more devices than this job has
        return _api.load(path)
    # Containers as partialstore.load(path) gives them: only the leaves differ.
    return info.with_stored_containers(_api.load(path, abstract))


def _leaf_metadata(node: Any) -> Iterator[LeafMetadata]:
    """Every ``LeafMetadata`` of a metadata tree (its containers are dicts, lists, tuples)."""
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list | tuple):
        for child in node:
            yield from _leaf_metadata(child)
    elif isinstance(node, LeafMetadata):
        yield node


def load_pytree(
    path: PathLike,
    abstract_state: Any = None,
    *,
    checkpointable_name: str | None = AUTO_CHECKPOINTABLE_KEY,
) -> Any:
    """``orbax.checkpoint.v1.load_pytree`` (deprecated in Orbax for ``load``): :func:`load`.

    Example:
        >>> load_pytree is not load  # same behaviour, Orbax's older name
        True
    """
    return load(path, abstract_state, checkpointable_name=checkpointable_name)


class _Partial:
    """``ocp.partial``: Orbax v1's partial-saving module, with its older names too.

    Example:
        >>> partial.save is save and partial.save_pytree is save
        True
    """

    def __init__(self) -> None:
        self.save = save
        self.save_async = save_async
        self.finalize = finalize
        # The names of the Orbax guide before ``save`` / ``save_async``.
        self.save_pytree = save
        self.save_pytree_async = save_async


#: ``ocp.partial.save / save_async / finalize`` (and ``save_pytree / save_pytree_async``).
partial = _Partial()
