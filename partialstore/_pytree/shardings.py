"""Saved shardings: a ``jax.Array``'s ``NamedSharding`` as JSON, and back onto devices.

A leaf entry of kind ``"jax_array"`` may carry ``"sharding"`` (format.md
§8): the mesh's shape, axis names, axis types and device ids, and the
partition spec. It is information about layout, never about bytes: the
array is stored whole either way, and a reader may ignore the field.

Only ``NamedSharding`` is recorded (JAX's one public multi-device
sharding). A ``SingleDeviceSharding`` is recorded as no sharding: restoring
places the array on the default device. Other kinds, and partition specs
with ``unreduced``/``reduced`` axes (partial sums, not a layout of the
saved values), are not recorded either.

Example:
    >>> import jax
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    >>> saved = SavedSharding.from_jax(sharding)
    >>> saved.encode()["spec"]
    ['data', None]
    >>> SavedSharding.decode(saved.encode(), ndim=2) == saved
    True
    >>> saved.to_jax("w", (4, 3)) == sharding
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from partialstore._pytree.keypaths import short_repr
from partialstore.errors import CorruptCheckpointError, InvalidInputError

if TYPE_CHECKING:
    import jax

__all__ = ["AXIS_TYPES", "SavedSharding", "SpecEntry"]

#: One entry of a partition spec: unsharded, one mesh axis, or several.
SpecEntry = None | str | tuple[str, ...]

#: ``jax.sharding.AxisType`` names as stored (lowercase).
AXIS_TYPES = ("auto", "explicit", "manual")

# Bounds on stored meshes, checked before anything is built from them.
_MAX_AXES = 32
_MAX_DEVICES = 1 << 24


def _bad(why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"its 'sharding' is malformed: {why}")


@dataclasses.dataclass(frozen=True)
class SavedSharding:
    """A ``NamedSharding`` as saved.

    Attributes:
      mesh_shape: the mesh's shape, one size per axis.
      axis_names: the mesh's axis names, in mesh order.
      spec: the partition spec, one entry per leading array dimension:
        ``None``, an axis name or a tuple of axis names.
      axis_types: ``"auto"``, ``"explicit"`` or ``"manual"`` per axis, if saved.
      device_ids: the mesh's device ids in mesh (C) order, if saved.
    """

    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    spec: tuple[SpecEntry, ...]
    axis_types: tuple[str, ...] | None = None
    device_ids: tuple[int, ...] | None = None

    @property
    def num_devices(self) -> int:
        """How many devices the saved mesh has."""
        return math.prod(self.mesh_shape)

    def encode(self) -> dict[str, Any]:
        """The JSON form (keys sorted, as on disk); example in the module docstring."""
        mesh: dict[str, Any] = {"axis_names": list(self.axis_names)}
        if self.axis_types is not None:
            mesh["axis_types"] = list(self.axis_types)
        if self.device_ids is not None:
            mesh["device_ids"] = list(self.device_ids)
        mesh["shape"] = list(self.mesh_shape)
        spec = [list(e) if isinstance(e, tuple) else e for e in self.spec]
        return {"kind": "named", "mesh": mesh, "spec": spec}

    @classmethod
    def from_jax(cls, sharding: Any) -> SavedSharding | None:
        """What is saved of ``sharding``: ``None`` unless it is a concrete ``NamedSharding``."""
        import jax

        if not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        mesh, spec = sharding.mesh, sharding.spec
        if not isinstance(mesh, jax.sharding.Mesh) or spec.unreduced or spec.reduced:
            return None
        entries: list[SpecEntry] = []
        for entry in spec:
            if entry is None or isinstance(entry, str):
                entries.append(entry)
            elif isinstance(entry, tuple) and all(isinstance(name, str) for name in entry):
                entries.append(tuple(entry))
            else:  # PartitionSpec.UNCONSTRAINED: no concrete layout to record
                return None
        return dataclasses.replace(_saved_mesh(mesh), spec=tuple(entries))

    @classmethod
    def decode(cls, obj: Any, ndim: int) -> SavedSharding | None:
        """Check a stored ``sharding`` of an array of rank ``ndim``.

        ``None`` for a sharding ``kind`` this version does not know (the
        field is information only, so a newer writer's kinds are ignored).

        Raises:
          CorruptCheckpointError: the field is malformed.
        """
        if not isinstance(obj, dict):
            raise _bad(f"not a JSON object but {short_repr(obj, 60)}")
        kind = obj.get("kind")
        if not isinstance(kind, str):
            raise _bad(f"'kind' must be a string, got {short_repr(kind, 40)}")
        if kind != "named":
            return None
        mesh = obj.get("mesh")
        if not isinstance(mesh, dict):
            raise _bad(f"'mesh' must be a JSON object, got {short_repr(mesh, 60)}")
        shape, names = _mesh_shape(mesh.get("shape")), _axis_names(mesh.get("axis_names"))
        if len(shape) != len(names):
            raise _bad(f"the mesh has {len(shape)} sizes but {len(names)} axis names")
        types = _axis_types(mesh.get("axis_types"), len(names))
        ids = _device_ids(mesh.get("device_ids"), math.prod(shape))
        spec = _spec(obj.get("spec"), names, ndim)
        return cls(shape, names, spec, types, ids)

    def to_jax(self, where: str, shape: Sequence[int], mesh: Any = None) -> jax.sharding.Sharding:
        """This sharding on ``mesh``, or on a mesh of the current devices like the saved one.

        ``where`` names the leaf in messages; ``shape`` is the array's.
        Without ``mesh``, the saved device ids are used when this process
        sees all of them, else the first devices of ``jax.devices()``.
        A given ``mesh`` must have every axis the spec names.

        Raises:
          InvalidInputError: too few devices, a mesh without the spec's
            axes, or a mesh whose axes do not divide the array.
        """
        from jax.sharding import NamedSharding

        if mesh is None:
            mesh = _current_mesh(self, where)
        used = [n for e in self.spec for n in ((e,) if isinstance(e, str) else e or ())]
        missing = [name for name in used if name not in mesh.axis_names]
        if missing:
            raise InvalidInputError(
                f"Leaf {where!r} was saved sharded over mesh axes {used} "
                f"({self.describe()}), but the given mesh has axes {list(mesh.axis_names)}, "
                f"without {missing}. Pass a mesh with those axis names, or load with your own "
                "target (jax.ShapeDtypeStructs with the shardings you want)."
            )
        sharding = NamedSharding(mesh, self.partition_spec())
        _check_divides(sharding, where, tuple(shape))
        return sharding

    def partition_spec(self) -> jax.sharding.PartitionSpec:
        """The saved spec as a ``jax.sharding.PartitionSpec``.

        Example:
            >>> SavedSharding((2, 4), ("data", "model"), (None, ("data", "model"))).partition_spec()
            P(None, ('data', 'model'))
        """
        from jax.sharding import PartitionSpec

        spec_class: Any = PartitionSpec  # jax leaves its constructor untyped
        spec: jax.sharding.PartitionSpec = spec_class(*self.spec)
        return spec

    def describe(self) -> str:
        """The saved mesh and spec in words, for messages.

        Example:
            >>> SavedSharding((2, 4), ("data", "model"), (None, "model")).describe()
            "mesh {'data': 2, 'model': 4} (8 devices), spec (None, 'model')"
        """
        axes = dict(zip(self.axis_names, self.mesh_shape, strict=True))
        return f"mesh {axes} ({self.num_devices} devices), spec {self.spec}"


@functools.lru_cache(maxsize=64)
def _saved_mesh(mesh: jax.sharding.Mesh) -> SavedSharding:
    """The mesh part, once per mesh: a save of many leaves shares a few meshes.

    Device ids are recorded only when ``jax.make_mesh`` would not choose
    that order on those devices (a mesh built by hand): the common mesh
    costs no ids per leaf, which on a pod of thousands of devices would
    make every leaf entry kilobytes long.
    """
    shape = tuple(int(n) for n in mesh.devices.shape)
    names = tuple(str(name) for name in mesh.axis_names)
    ids = tuple(int(d.id) for d in mesh.devices.flat)
    by_id = sorted(mesh.devices.flat, key=lambda d: int(d.id))
    return SavedSharding(
        mesh_shape=shape,
        axis_names=names,
        spec=(),
        axis_types=tuple(t.name.lower() for t in mesh.axis_types),
        device_ids=None if _default_order(shape, names, by_id) == ids else ids,
    )


def _default_order(
    shape: tuple[int, ...], names: tuple[str, ...], devices: Sequence[Any]
) -> tuple[int, ...] | None:
    """The device ids, in mesh order, of ``jax.make_mesh`` over ``devices``."""
    import jax

    try:
        mesh = jax.make_mesh(shape, names, devices=devices)
    except Exception:  # a shape make_mesh cannot lay out on this topology: record ids
        return None
    return tuple(int(d.id) for d in mesh.devices.flat)


def _mesh_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not 0 < len(shape) <= _MAX_AXES:
        raise _bad(f"the mesh 'shape' must be a list of 1 to {_MAX_AXES} sizes")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise _bad(f"mesh sizes must be ints >= 1, got {short_repr(shape, 60)}")
    if math.prod(shape) > _MAX_DEVICES:
        raise _bad(f"a mesh of {short_repr(shape, 60)} has more than {_MAX_DEVICES} devices")
    return tuple(shape)


def _axis_names(names: Any) -> tuple[str, ...]:
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise _bad(f"'axis_names' must be a list of non-empty strings, got {short_repr(names, 60)}")
    if len(set(names)) != len(names):
        raise _bad(f"axis names repeat: {short_repr(names, 60)}")
    return tuple(names)


def _axis_types(types: Any, count: int) -> tuple[str, ...] | None:
    if types is None:
        return None
    if (
        not isinstance(types, list)
        or len(types) != count
        or any(t not in AXIS_TYPES for t in types)
    ):
        raise _bad(f"'axis_types' must be {count} of {AXIS_TYPES}, got {short_repr(types, 60)}")
    return tuple(types)


def _device_ids(ids: Any, count: int) -> tuple[int, ...] | None:
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) != count:
        raise _bad(f"'device_ids' must list the mesh's {count} devices, got {short_repr(ids, 60)}")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise _bad(f"device ids must be ints >= 0, got {short_repr(ids, 60)}")
    if len(set(ids)) != count:
        raise _bad(f"device ids repeat: {short_repr(ids, 60)}")
    return tuple(ids)


def _spec(spec: Any, names: tuple[str, ...], ndim: int) -> tuple[SpecEntry, ...]:
    if not isinstance(spec, list) or len(spec) > ndim:
        raise _bad(f"'spec' must be a list of at most {ndim} entries, got {short_repr(spec, 60)}")
    entries: list[SpecEntry] = []
    used: list[str] = []
    for entry in spec:
        if entry is None:
            entries.append(None)
            continue
        group = [entry] if isinstance(entry, str) else entry
        if not isinstance(group, list) or any(n not in names for n in group):
            raise _bad(f"spec entry {short_repr(entry, 60)} is not null or axes of {list(names)}")
        used += group
        entries.append(entry if isinstance(entry, str) else tuple(group))
    if len(set(used)) != len(used):
        raise _bad(f"the spec {short_repr(spec, 60)} uses a mesh axis twice")
    return tuple(entries)


def _current_mesh(saved: SavedSharding, where: str) -> jax.sharding.Mesh:
    """A mesh like the saved one on this job's devices."""
    mesh = _mesh_like(saved.mesh_shape, saved.axis_names, saved.axis_types, saved.device_ids)
    if mesh is not None:
        return mesh
    import jax

    devices = jax.devices()
    raise InvalidInputError(
        f"Leaf {where!r} was saved with a NamedSharding over {saved.describe()}, but this "
        f"job has {len(devices)} {devices[0].platform} device(s). To restore it anyway, pass "
        "abstract_tree(mesh=...) a mesh of these devices with axis names "
        f"{list(saved.axis_names)}, or load with your own target (jax.ShapeDtypeStructs "
        "with the shardings you want)."
    )


@functools.lru_cache(maxsize=64)
def _mesh_like(
    shape: tuple[int, ...],
    names: tuple[str, ...],
    types: tuple[str, ...] | None,
    ids: tuple[int, ...] | None,
) -> jax.sharding.Mesh | None:
    """A mesh of this job's devices like the saved one; ``None`` if there are too few.

    The saved devices in the saved order if all exist, else ``jax.make_mesh``
    over the first devices. Axis types absent (another writer) mean auto,
    JAX's classic behaviour. Cached: the leaves of a checkpoint share a few meshes.
    """
    import jax
    import numpy as np

    axis_types = tuple(
        jax.sharding.AxisType[t.capitalize()] for t in types or ["auto"] * len(names)
    )
    devices = jax.devices()
    by_id = {int(d.id): d for d in devices}
    if ids is not None and all(i in by_id for i in ids):
        grid = np.array([by_id[i] for i in ids], dtype=object).reshape(shape)
        return jax.sharding.Mesh(grid, names, axis_types=axis_types)
    count = math.prod(shape)
    if len(devices) < count:
        return None
    return jax.make_mesh(shape, names, axis_types, devices=devices[:count])


def _check_divides(
    sharding: jax.sharding.NamedSharding, where: str, shape: tuple[int, ...]
) -> None:
    sizes = dict(sharding.mesh.shape)
    for dim, entry in enumerate(sharding.spec):
        axes = (entry,) if isinstance(entry, str) else entry or ()
        parts = math.prod(sizes[name] for name in axes)
        if dim < len(shape) and shape[dim] % parts:
            raise InvalidInputError(
                f"Leaf {where!r} has shape {shape}; its dimension {dim} ({shape[dim]}) cannot "
                f"be split into {parts} parts over mesh axes {list(axes)} of the mesh "
                f"{sizes}. Pass a mesh whose axes divide it, or load with your own target."
            )
