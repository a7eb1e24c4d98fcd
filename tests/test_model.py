"""Model-based test of the public API's semantics, on every backend.

A hypothesis state machine drives ``save``, ``save_async`` (and
``AsyncResponse.result``), replacements of every kind, ``custom_metadata``
merges, ``finalize``, ``discard``, ``load`` (whole, ``select=``, and a
``target=`` of ``jax.ShapeDtypeStruct``), ``metadata`` and ``gc`` on two
sibling checkpoint paths whose names share a prefix (``p0`` and ``p0-1``),
and checks every outcome against the plain-Python model of README's
"Semantics" in ``tests/_model.py``: the exception each call must raise, and
the whole loaded tree bit-exact after ``finalize``. Each example runs under
a fresh root; the runs are derandomized, so CI sees the same examples.

Example::

    pytest tests/test_model.py -k memory
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import sys
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import _model as model
import jax
import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

import partialstore
from partialstore import errors
from partialstore._commit import logread

# Examples per backend: the merge, encoding and error rules live in the core,
# so the fast stores run the most; the emulated object stores enough to meet
# every rule on them. Sized so all five together stay well under 90 s on the
# 2-core CI machine.
EXAMPLES = {"memory": 150, "local": 40, "fsspec": 60, "gcs": 40, "s3": 25}
SETTINGS = settings(stateful_step_count=30, deadline=None, derandomize=True, database=None)
# Long enough for a slow emulator; a save that takes longer is a failure, not slowness.
WAIT_S = 120.0

slots = st.sampled_from((0, 1))
replacements = {
    "leaf": model.leaf_values,
    "dict": model.dicts(model.subtrees, min_size=1, max_size=2),
    "list": st.lists(model.subtrees, min_size=1, max_size=2),
    "tuple": st.lists(model.subtrees, min_size=1, max_size=2).map(tuple),
}


@dataclasses.dataclass
class Save:
    """One committed (or queued) save of the model: its tree and custom_metadata."""

    tree: Any
    custom_metadata: Any


@dataclasses.dataclass
class Finalized:
    """A finalized checkpoint of the model."""

    saves: list[Save]
    collected: set[int] = dataclasses.field(default_factory=set)  # saves gc deleted
    strays: int = 0  # saves refused since the last gc, which may have left data

    @functools.cached_property
    def tree(self) -> Any:
        return merged_tree(self.saves)

    @functools.cached_property
    def custom_metadata(self) -> Any:
        return merged_metadata(self.saves)


@dataclasses.dataclass
class Slot:
    """One checkpoint path: its open session (None: none), pending save_asyncs, checkpoint."""

    name: str
    session: list[Save] | None = None
    pending: list[partialstore.AsyncResponse] = dataclasses.field(default_factory=list)
    final: Finalized | None = None


def merged_tree(saves: list[Save]) -> Any:
    """The tree the saves make, merged in commit order."""
    return functools.reduce(model.merge, (save.tree for save in saves), {})


def merged_metadata(saves: list[Save]) -> Any:
    """The custom_metadata the saves make, merged in commit order (None if none had any)."""
    merged = None
    for save in saves:
        if save.custom_metadata is not None:
            merged = model.merge_metadata(merged, save.custom_metadata)
    return merged


def scribble(state: Any) -> None:
    """Overwrite every array of ``state`` in place, as a caller reusing its buffers would."""
    if isinstance(state, np.ndarray):
        state.reshape(-1).view(np.uint8)[:] = 0xA5
    elif type(state) is dict:
        for value in state.values():
            scribble(value)
    elif type(state) in (list, tuple):
        for value in state:
            scribble(value)


def sharding() -> jax.sharding.Sharding:
    """Where ``load(target=...)`` places arrays in this test."""
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def target_of(tree: Any) -> Any:
    """A load target of the model tree's structure: arrays become ShapeDtypeStructs."""
    if isinstance(tree, model.Stored):
        value = tree.value
        if isinstance(value, np.ndarray):
            return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding())
        return value
    if type(tree) is dict:
        return {key: target_of(value) for key, value in tree.items()}
    return type(tree)(target_of(value) for value in tree)


def assert_target_leaf(expected: Any, actual: Any, where: str) -> None:
    """Arrays loaded into a ShapeDtypeStruct are jax.Arrays placed as asked, bit-exact."""
    if not isinstance(expected, np.ndarray):
        model.assert_leaf(expected, actual, where)
        return
    assert isinstance(actual, jax.Array), f"{where}: {type(actual)} is not a jax.Array"
    assert actual.sharding == sharding(), f"{where}: sharding {actual.sharding}"
    model.assert_leaf(expected, np.asarray(actual), where)


Refusal = tuple[type[BaseException], Callable[..., Any], dict[str, Any]]


def raises(expected: type[BaseException], call: Callable[..., Any], *args: Any, **kw: Any) -> None:
    """Assert ``call`` raises ``expected``, as one of partialstore's errors."""
    with pytest.raises(expected) as info:
        call(*args, **kw)
    assert isinstance(info.value, errors.PartialStoreError), repr(info.value)


class PartialStoreMachine(RuleBasedStateMachine):
    """The public API on two checkpoint paths against the model (bound to a backend below)."""

    base: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.root = f"{self.base}/{uuid.uuid4().hex[:12]}"
        self.generation = [0, 0]
        self.slots = [Slot(self._name(0)), Slot(self._name(1))]

    def _name(self, p: int) -> str:
        # "p0" and "p0-1": siblings whose names share a prefix, to catch prefix listings.
        return f"p{self.generation[p]}" + ("-1" if p else "")

    def _path(self, p: int) -> str:
        return f"{self.root}/{self.slots[p].name}"

    def _call(self, function: Callable[..., Any], p: int, *args: Any, **kw: Any) -> Any:
        return function(self._path(p), *args, storage_options=self.options, **kw)

    def _raises(
        self, expected: type[BaseException], function: Callable[..., Any], p: int, **kw: Any
    ) -> None:
        raises(expected, function, self._path(p), storage_options=self.options, **kw)

    def _save(self, p: int, state: Any, metadata: Any, *, blocking: bool) -> None:
        slot = self.slots[p]
        expected = Save(model.snapshot(state, len(slot.session or [])), metadata)
        function = partialstore.save if blocking else partialstore.save_async
        if slot.final is not None:
            self._raises(FileExistsError, function, p, state=state, custom_metadata=metadata)
            if blocking:  # a blocking save writes while it checks, then cleans up
                slot.final.strays += 1
            return
        result = function(
            self._path(p), state, custom_metadata=metadata, storage_options=self.options
        )
        if blocking:
            assert result is None
        else:
            slot.pending.append(result)
            scribble(state)  # save_async snapshotted the state: the caller may reuse it
        slot.session = [*(slot.session or []), expected]

    def _drain(self, slot: Slot, *, done: bool) -> None:
        """Every pending save_async of ``slot`` succeeded (and is ``done`` already if asked)."""
        for response in slot.pending:
            assert response.done() or not done, "finalize returned before a pending save"
            assert response.result(timeout=WAIT_S) is None
        slot.pending.clear()

    @rule(p=slots, state=model.states, metadata=model.custom_metadata)
    def save(self, p: int, state: Any, metadata: Any) -> None:
        self._save(p, state, metadata, blocking=True)

    @rule(p=slots, state=model.states, metadata=model.custom_metadata)
    def save_async(self, p: int, state: Any, metadata: Any) -> None:
        self._save(p, state, metadata, blocking=False)

    def _replaceable(self) -> list[tuple[int, tuple[str, ...]]]:
        return [
            (p, path)
            for p, slot in enumerate(self.slots)
            if slot.session
            for path in model.dict_paths(merged_tree(slot.session))
        ]

    @precondition(lambda self: self._replaceable())
    @rule(data=st.data())
    def replace_existing(self, data: st.DataObject) -> None:
        """Save over a key the session holds: any kind over any kind (same kinds merge).

        Its custom_metadata goes over a key the session's metadata holds, too.
        """
        p, path = data.draw(st.sampled_from(self._replaceable()))
        saves = self.slots[p].session or []
        old = model.kind_of(model.subtree(merged_tree(saves), path))
        new = data.draw(st.sampled_from(sorted(replacements)))
        event(f"replace {old} by {new}")
        state = data.draw(replacements[new])
        for key in reversed(path):
            state = {key: state}
        held = model.dict_paths(merged_metadata(saves))
        if held:
            metadata = data.draw(model.json_values)
            for key in reversed(data.draw(st.sampled_from(held))):
                metadata = {key: metadata}
        else:
            metadata = data.draw(model.custom_metadata)
        self._save(p, state, metadata, blocking=data.draw(st.booleans()))

    def _open(self) -> list[int]:
        return [p for p, slot in enumerate(self.slots) if slot.final is None]

    @precondition(lambda self: self._open())
    @rule(data=st.data())
    def save_bad_input(self, data: st.DataObject) -> None:
        """A save with an unsupported leaf or bad custom_metadata raises and writes nothing.

        The model does not change: without a session there is still none.
        """
        p = data.draw(st.sampled_from(self._open()))
        state = data.draw(st.dictionaries(model.keys, model.subtrees, max_size=2))
        metadata = data.draw(model.custom_metadata)
        if data.draw(st.booleans()):
            path = data.draw(st.lists(model.keys, min_size=1, max_size=3).map(tuple))
            bad = data.draw(model.unsupported_leaves)
            state[path[0]] = functools.reduce(lambda v, k: {k: v}, reversed(path[1:]), bad)
            expected, needle = TypeError, "/".join(path)
        else:
            metadata = data.draw(model.bad_custom_metadata)
            expected, needle = ValueError, "custom_metadata"
        event(f"bad input -> {expected.__name__}")
        function = data.draw(st.sampled_from((partialstore.save, partialstore.save_async)))
        with pytest.raises(expected, match=re.escape(needle)) as info:
            self._call(function, p, state, custom_metadata=metadata)
        assert isinstance(info.value, errors.PartialStoreError), repr(info.value)

    @precondition(lambda self: any(slot.pending for slot in self.slots))
    @rule(data=st.data())
    def wait_for_save(self, data: st.DataObject) -> None:
        pending = [(slot, i) for slot in self.slots for i in range(len(slot.pending))]
        slot, index = data.draw(st.sampled_from(pending))
        assert slot.pending.pop(index).result(timeout=WAIT_S) is None

    def _with_session(self) -> list[int]:
        return [p for p, slot in enumerate(self.slots) if slot.session]

    def _finalized(self) -> list[int]:
        return [p for p, slot in enumerate(self.slots) if slot.final is not None]

    @precondition(lambda self: self._with_session())
    @rule(data=st.data())
    def finalize(self, data: st.DataObject) -> None:
        self._finalize(data.draw(st.sampled_from(self._with_session())))

    def _finalize(self, p: int) -> None:
        slot = self.slots[p]
        self._call(partialstore.finalize, p)
        self._drain(slot, done=True)
        slot.final, slot.session = Finalized(slot.session or []), None
        # What was published, at once: so every finalize is checked, not only
        # those a later load happens to visit.
        self._check_load(p)
        self._check_metadata(p)

    @precondition(lambda self: self._with_session())
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self._with_session()))
        slot = self.slots[p]
        self._call(partialstore.discard, p)
        # The session's queued save_asyncs are part of what was abandoned.
        self._drain(slot, done=False)
        slot.session = None

    def _refusals(self, p: int) -> list[Refusal]:
        """The calls the model says must fail at slot ``p`` now, with the error each raises."""
        slot = self.slots[p]
        target = {"a": jax.ShapeDtypeStruct((1,), np.float32, sharding=sharding())}
        if slot.final is not None:
            state = {"a": np.ones(3, np.float32)}
            return [
                (FileExistsError, partialstore.save, {"state": state}),
                (FileExistsError, partialstore.save_async, {"state": state}),
                (FileExistsError, partialstore.finalize, {}),
                (FileExistsError, partialstore.discard, {}),
            ]
        refused: list[Refusal] = [
            (FileNotFoundError, partialstore.load, {}),
            (FileNotFoundError, partialstore.load, {"select": ["a"]}),
            (FileNotFoundError, partialstore.load, {"target": target}),
            (FileNotFoundError, partialstore.metadata, {}),
            (FileNotFoundError, partialstore.gc, {}),
        ]
        if slot.session is None:
            refused += [
                (FileNotFoundError, partialstore.finalize, {}),
                (FileNotFoundError, partialstore.discard, {}),
            ]
        return refused

    @rule(p=slots, data=st.data())
    def refused(self, p: int, data: st.DataObject) -> None:
        """A call the model says must fail: it raises the model's error and changes nothing."""
        expected, function, kwargs = data.draw(st.sampled_from(self._refusals(p)))
        event(f"refused: {function.__name__}{sorted(kwargs)} -> {expected.__name__}")
        self._raises(expected, function, p, **kwargs)
        final = self.slots[p].final
        if function is partialstore.save and final is not None:
            final.strays += 1  # a blocking save writes while it checks, then cleans up

    def _check_load(self, p: int) -> None:
        final = self.slots[p].final
        assert final is not None
        model.assert_exact(final.tree, self._call(partialstore.load, p))

    def _check_metadata(self, p: int) -> None:
        final = self.slots[p].final
        assert final is not None
        info = self._call(partialstore.metadata, p)
        model.assert_exact(model.metadata_tree(final.tree), info.tree)
        model.assert_json_exact(final.custom_metadata, info.custom_metadata)
        assert [save["num_leaves"] for save in info.saves] == [
            model.count_leaves(save.tree) for save in final.saves
        ]
        assert isinstance(info.finalized, str)

    @precondition(lambda self: self._finalized())
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        self._check_load(data.draw(st.sampled_from(self._finalized())))

    @precondition(lambda self: self._finalized())
    @rule(data=st.data())
    def load_selected(self, data: st.DataObject) -> None:
        """load(select=...) of held subtrees, or of missing ones (FileNotFoundError)."""
        p = data.draw(st.sampled_from(self._finalized()))
        final = self.slots[p].final
        assert final is not None
        held = model.dict_paths(final.tree)
        # Mostly subtrees the checkpoint holds; now and then any key path (often missing).
        if held and data.draw(st.integers(0, 3)):
            selector = st.sampled_from(held)
        else:
            selector = st.lists(model.keys, min_size=1, max_size=2).map(tuple)
        paths = data.draw(st.lists(selector, min_size=1, max_size=2))
        select: list[Any] = (
            ["/".join(map(str, path)) for path in paths]
            if data.draw(st.booleans())
            else list(paths)
        )
        expected = model.select(final.tree, paths)
        event(f"select: {'held' if expected is not None else 'missing'}")
        if expected is None:
            self._raises(FileNotFoundError, partialstore.load, p, select=select)
        else:
            model.assert_exact(expected, self._call(partialstore.load, p, select=select))

    @precondition(lambda self: self._finalized())
    @rule(data=st.data())
    def load_target(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self._finalized()))
        final = self.slots[p].final
        assert final is not None
        expected = model.without_mixed_keys(final.tree)  # a jax target cannot mix them
        event(f"target: {'part' if expected != final.tree else 'whole tree'}")
        loaded = self._call(partialstore.load, p, target=target_of(expected))
        model.assert_exact(expected, loaded, leaf=assert_target_leaf)

    @precondition(lambda self: self._finalized())
    @rule(data=st.data())
    def metadata(self, data: st.DataObject) -> None:
        self._check_metadata(data.draw(st.sampled_from(self._finalized())))

    @precondition(lambda self: self._finalized())
    @rule(data=st.data())
    def gc(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self._finalized()))
        final = self.slots[p].final
        assert final is not None
        ids = [save["save_id"] for save in self._call(partialstore.metadata, p).saves]
        removed = self._call(partialstore.gc, p)
        must, may = model.array_kind_saves([save.tree for save in final.saves], final.tree)
        by_dir = {f"data/{save_id}": number for number, save_id in enumerate(ids)}
        known = {by_dir[d] for d in removed if d in by_dir}
        assert len(set(removed)) == len(removed), removed
        assert must - final.collected <= known <= may - final.collected, (removed, must, may)
        # Only a refused save can have left data that no committed save owns.
        assert len(removed) - len(known) <= final.strays, removed
        final.collected |= known
        final.strays = 0
        # gc never deletes what the checkpoint uses.
        model.assert_exact(final.tree, self._call(partialstore.load, p))

    @precondition(lambda self: any(slot.final is not None for slot in self.slots))
    @rule(data=st.data())
    def next_checkpoint(self, data: st.DataObject) -> None:
        """Move a slot whose checkpoint is finalized to a fresh path, so saving goes on."""
        p = data.draw(st.sampled_from([i for i, s in enumerate(self.slots) if s.final]))
        self.generation[p] += 1
        self.slots[p] = Slot(self._name(p))

    def teardown(self) -> None:
        """End of an example: every session still open must finalize into the model's tree.

        So every sequence of saves is checked, not only those a finalize rule
        happened to end. Skipped when a rule already failed (its exception is
        in flight here), so that failure is the one reported; the pending
        saves are then only drained, so no example outlives its own.
        """
        if sys.exc_info()[1] is None:
            for p, slot in enumerate(self.slots):
                if slot.session:
                    self._finalize(p)
            return
        for slot in self.slots:
            for response in slot.pending:
                with contextlib.suppress(Exception):
                    response.result(timeout=WAIT_S)


def test_api_matches_model(
    any_backend_url: tuple[str, dict[str, Any]],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Random sequences of API calls on one backend behave exactly as the model says."""
    base, options = any_backend_url
    kind = request.node.callspec.params["any_backend_url"]
    # Logs of version 3 keep records from number segment() on in folders: at ten
    # instead of a thousand, the examples' logs cross into them (test_log_version_3).
    monkeypatch.setattr(logread, "SEGMENT_DIGITS", 1)
    machine = type(
        "PartialStoreMachineOnBackend", (PartialStoreMachine,), {"base": base, "options": options}
    )
    run_state_machine_as_test(machine, settings=settings(SETTINGS, max_examples=EXAMPLES[kind]))
