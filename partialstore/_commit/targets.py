"""What a load target's leaf asks for: the concrete sharding its ``jax.Array`` gets.

Users write targets in three forms that JAX itself does not place:

- ``jax.ShapeDtypeStruct`` without a sharding (``jax.eval_shape`` output):
  the array goes where ``jnp.asarray`` would put it: replicated over the
  mesh ``jax.set_mesh`` installed, else on the default device;
- a ``NamedSharding`` over an ``AbstractMesh`` (``nnx.eval_shape`` under
  ``jax.set_mesh(mesh)``): resolved against the ambient concrete mesh, the
  one ``jax.set_mesh`` installed, which must have the same axis names and sizes;
- a ``jax.Array`` or a ``ShapeDtypeStruct`` with a concrete sharding: used as is.

Anything else (numpy arrays, Python scalars, ``None``) asks for no device
placement and comes back as stored.

The mesh ``jax.set_mesh`` installs is local to the calling thread, and loads
run on partialstore's I/O thread, so :func:`resolve_target` runs in the
caller's thread first (``partialstore.load`` does this).

Example:
    >>> import jax
    >>> import numpy as np
    >>> leaf = jax.ShapeDtypeStruct((3,), np.float32)
    >>> sharding_for(leaf, "params/w")
    SingleDeviceSharding(device=CpuDevice(id=0), memory_kind=device)
    >>> sharding_for(np.zeros(3), "params/w") is None
    True
"""

from __future__ import annotations

from typing import Any

from partialstore._pytree import tree
from partialstore.errors import InvalidInputError

__all__ = ["default_sharding", "resolve_target", "sharding_for"]


def default_sharding() -> Any:
    """Where ``jnp.asarray`` puts a new array in this thread.

    Under ``jax.set_mesh(mesh)``: replicated over ``mesh`` (so the array can
    go into a ``jax.jit`` computation on that mesh). Otherwise a
    ``SingleDeviceSharding`` on ``jax.config.jax_default_device`` when set (a
    device or a platform name), else on this process's first local device.

    Example:
        >>> import jax
        >>> default_sharding().device_set == {jax.local_devices()[0]}
        True
        >>> with jax.set_mesh(jax.make_mesh((1,), ("x",))):
        ...     default_sharding().spec == jax.sharding.PartitionSpec()  # replicated
        True
    """
    import jax

    mesh = jax.sharding.get_mesh()
    if mesh is not None and not mesh.empty:
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # type: ignore[no-untyped-call]
    device = getattr(jax.config, "jax_default_device", None)
    if isinstance(device, str):  # a platform name such as "cpu"
        device = jax.local_devices(backend=device)[0]
    if device is None:
        device = jax.local_devices()[0]
    return jax.sharding.SingleDeviceSharding(device)


def _ambient_mesh(abstract: Any, where: str) -> Any:
    """The concrete mesh that ``jax.set_mesh`` installed, checked against ``abstract``."""
    import jax

    mesh = jax.sharding.get_mesh()
    if mesh is None or mesh.empty:
        raise InvalidInputError(
            f"Target leaf {where} has a sharding over an AbstractMesh (what nnx.eval_shape "
            "gives under jax.set_mesh) and no concrete mesh is set: call load inside "
            "`with jax.set_mesh(mesh):` with the mesh the target was built for, or give the "
            "leaf a NamedSharding over a concrete jax.sharding.Mesh."
        )
    wanted = dict(zip(abstract.axis_names, abstract.axis_sizes, strict=True))
    ambient = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    if wanted != ambient:
        raise InvalidInputError(
            f"Target leaf {where} has a sharding over an AbstractMesh with axes {wanted}, but "
            f"the mesh set by jax.set_mesh has axes {ambient}: load under the mesh the target "
            "was built for."
        )
    return mesh


def sharding_for(leaf: Any, where: str) -> Any:
    """The concrete ``jax.sharding.Sharding`` a target leaf asks for, or ``None``.

    ``where`` names the leaf in error messages. ``None`` means the leaf asks
    for no device placement (numpy arrays, scalars, ``None``).

    Raises:
      InvalidInputError: the leaf's sharding is over an ``AbstractMesh`` and no
        matching concrete mesh is set.
    """
    import jax

    if isinstance(leaf, jax.Array):
        return leaf.sharding
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        # Other abstract arrays that carry a concrete sharding are placed by it.
        sharding = getattr(leaf, "sharding", None)
        return sharding if isinstance(sharding, jax.sharding.Sharding) else None
    sharding = leaf.sharding
    if sharding is None:
        return default_sharding()
    mesh = getattr(sharding, "mesh", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
        mesh, jax.sharding.AbstractMesh
    ):
        return jax.sharding.NamedSharding(
            _ambient_mesh(mesh, where), sharding.spec, memory_kind=sharding.memory_kind
        )
    return sharding


def resolve_target(target: Any) -> Any:
    """``target`` with every ``jax.ShapeDtypeStruct`` given its concrete sharding.

    Call it in the thread that called ``load``: that is where ``jax.set_mesh``
    is in effect. Other leaves are kept as they are.

    Example:
        >>> import jax
        >>> import numpy as np
        >>> with jax.set_mesh(jax.make_mesh((1,), ("x",))):
        ...     abstract = jax.eval_shape(lambda: jax.numpy.ones(3, np.float32))
        ...     resolved = resolve_target({"w": abstract})
        >>> type(resolved["w"].sharding.mesh).__name__
        'Mesh'

    Raises:
      InvalidInputError: a sharding is over an ``AbstractMesh`` and no matching
        concrete mesh is set (see :func:`sharding_for`).
    """
    import jax

    paths, leaves, treedef = tree.target_leaf_paths(target)
    resolved = []
    for path, leaf in zip(paths, leaves, strict=True):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            sharding = sharding_for(leaf, tree.format_path(path))
            leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)  # type: ignore[no-untyped-call]
        resolved.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, resolved)
