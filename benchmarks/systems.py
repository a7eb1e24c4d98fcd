"""The systems under test and the workloads they save.

A *checkpoint system* (partialstore, Orbax) has ``save(url, state)``,
``finalize(url)`` and ``load(url)``. A *raw system* (TensorStore, numpy) has
no checkpoint protocol: it writes and reads a flat set of arrays.

A :class:`Workload` is ``saves`` partial saves of ``leaves`` float32 arrays of
``leaf_bytes`` each. Save ``i`` holds ``{"s<i>": {"l<j>": array}}``, so saves
never replace each other's keys (Orbax cannot replace). Arrays hold random
values (so no codec can compress them away) and are made once per worker,
before any timing.

Example::

    work = Workload("a", saves=4, leaves=4, leaf_bytes=16 << 20)
    states = build_states(work, seed=0)
    system = make_checkpoint_system("partialstore", store)
    for state in states:
        system.save(url, state)
    system.finalize(url)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

CHECKPOINT_SYSTEMS = ("partialstore", "orbax")
#: Raw TensorStore writing each save's arrays in a blocking call of its own,
#: measured call by call as the checkpoint systems are (the bound of blocking
#: saves; ``benchmarks.baselines.TensorStorePerSaveSystem``). Throughput only:
#: it has nothing to finalize.
PER_SAVE_RAW_SYSTEM = "tensorstore-per-save"
RAW_SYSTEMS = ("tensorstore", "numpy")


class CheckpointSystem(Protocol):
    """What the benchmarks call on partialstore and on Orbax."""

    name: str
    cost_exponent: float

    def save(self, url: str, state: Any) -> None: ...

    def finalize(self, url: str) -> None: ...

    def load(self, url: str) -> Any: ...


class PartialstoreSystem:
    """partialstore's public API with the store's ``storage_options``.

    Example::

        PartialstoreSystem({}).save("/tmp/ckpt", {"a": np.ones(3)})
    """

    name = "partialstore"
    cost_exponent = 1.0

    def __init__(self, storage_options: Mapping[str, Any], *, pipelined: bool = False) -> None:
        import partialstore

        self._ps = partialstore
        self._options = dict(storage_options) or None
        # Pipelined: each save is a save_async, so the next save's arrays upload
        # while the previous one commits; finalize waits for them all.
        self._pipelined = pipelined
        self._pending: list[Any] = []

    def save(self, url: str, state: Any) -> None:
        if self._pipelined:
            self._pending.append(self._ps.save_async(url, state, storage_options=self._options))
        else:
            self._ps.save(url, state, storage_options=self._options)

    def finalize(self, url: str) -> None:
        pending, self._pending = self._pending, []
        for response in pending:
            response.result()  # a failed save must fail the measurement
        self._ps.finalize(url, storage_options=self._options)

    def load(self, url: str) -> Any:
        return self._ps.load(url, storage_options=self._options)


def make_checkpoint_system(name: str, store: Any, *, pipelined: bool = False) -> CheckpointSystem:
    """Build the checkpoint system ``name`` (``partialstore`` or ``orbax``) for ``store``.

    ``pipelined`` makes partialstore's saves ``save_async`` calls, waited for by finalize.
    """
    if name == "partialstore":
        return PartialstoreSystem(store.storage_options, pipelined=pipelined)
    if name == "orbax":
        from benchmarks.baselines import OrbaxSystem

        return OrbaxSystem()
    if name == "tensorstore-per-save":
        from benchmarks.baselines import TensorStorePerSaveSystem

        return TensorStorePerSaveSystem(store)
    raise ValueError(f"unknown checkpoint system {name!r}; choose from {CHECKPOINT_SYSTEMS}")


@dataclasses.dataclass(frozen=True)
class Workload:
    """``saves`` partial saves of ``leaves`` float32 arrays of ``leaf_bytes`` each.

    Example::

        Workload("b", saves=4, leaves=250, leaf_bytes=4096).total_bytes  # 4 MB
    """

    name: str
    saves: int
    leaves: int
    leaf_bytes: int
    description: str = ""
    # Distinct arrays for every leaf of every save; otherwise the same
    # ``leaves`` arrays are reused by every save (content does not matter to
    # the systems, and it keeps 1,000-save series small in memory).
    distinct: bool = True

    @property
    def total_bytes(self) -> int:
        return self.saves * self.leaves * self.leaf_bytes

    @property
    def keys(self) -> int:
        return self.saves * self.leaves

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "total_bytes": self.total_bytes,
            "keys": self.keys,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Workload:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def scaled_to(self, max_total_bytes: int) -> Workload:
        """This workload with leaves shrunk so the total is at most ``max_total_bytes``."""
        if self.total_bytes <= max_total_bytes:
            return self
        leaf = max(4, (max_total_bytes // self.keys) // 4 * 4)
        note = f"{self.saves} saves x {self.leaves} leaves x {leaf} B (shrunk to fit the emulator)"
        return dataclasses.replace(self, leaf_bytes=leaf, description=note)


def leaf_shape(leaf_bytes: int) -> tuple[int, ...]:
    """float32 shape for a leaf: 2-D rows of 1,024 from 1 MiB up, 1-D below."""
    elements = max(1, leaf_bytes // 4)
    if leaf_bytes >= (1 << 20) and elements % 1024 == 0:
        return (elements // 1024, 1024)
    return (elements,)


def build_states(work: Workload, seed: int = 0) -> list[dict[str, dict[str, np.ndarray]]]:
    """The list of partial-save states of ``work`` (random float32 arrays)."""
    rng = np.random.default_rng(seed)
    shape = leaf_shape(work.leaf_bytes)

    def fresh() -> np.ndarray:
        return rng.random(shape, dtype=np.float32)

    shared = [fresh() for _ in range(work.leaves)] if not work.distinct else []
    states = []
    for i in range(work.saves):
        leaves = {f"l{j}": (fresh() if work.distinct else shared[j]) for j in range(work.leaves)}
        states.append({f"s{i}": leaves})
    return states


def flat_arrays(states: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """All leaves of all saves as ``{"a<k>": array}`` for the raw systems.

    Storage names are indices, never user keys, as in partialstore.
    """
    arrays: dict[str, np.ndarray] = {}
    for state in states:
        for leaves in state.values():
            for array in leaves.values():
                arrays[f"a{len(arrays)}"] = array
    return arrays


def state_bytes(state: Any) -> int:
    """Bytes of all arrays in one partial-save state."""
    return sum(array.nbytes for leaves in state.values() for array in leaves.values())


def verify_tree(loaded: Any, states: list[dict[str, dict[str, np.ndarray]]]) -> str | None:
    """``None`` if ``loaded`` holds every leaf of ``states`` bit for bit, else what differs."""
    for state in states:
        for save_key, leaves in state.items():
            for leaf_key, expected in leaves.items():
                try:
                    got = np.asarray(loaded[save_key][leaf_key])
                except (KeyError, TypeError, IndexError):
                    return f"missing leaf {save_key}/{leaf_key}"
                if got.shape != expected.shape or got.dtype != expected.dtype:
                    return (
                        f"{save_key}/{leaf_key}: {got.dtype}{got.shape} "
                        f"!= {expected.dtype}{expected.shape}"
                    )
                if not np.array_equal(got, expected):
                    return f"{save_key}/{leaf_key}: values differ"
    return None


def verify_arrays(loaded: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> str | None:
    """``None`` if ``loaded`` equals ``arrays`` bit for bit, else what differs."""
    for name, expected in arrays.items():
        got = loaded.get(name)
        if got is None:
            return f"missing array {name}"
        if got.shape != expected.shape or not np.array_equal(got, expected):
            return f"array {name} differs"
    return None
