"""``partialstore info``'s two forms: a JSON dict and a rich tree with tables.

Each leaf shows its saved sharding, if the checkpoint recorded one (a
``jax.Array`` saved with a ``NamedSharding``): in words in the tree
(:meth:`~partialstore.SavedSharding.describe`), as its manifest JSON in
``"sharding"`` with ``--json`` (``null`` for leaves without one).

Example:
    >>> import numpy as np
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> path = f"{tmp.name}/step_1"
    >>> partialstore.save(path, {"w": np.zeros((2, 3), np.float32), "step": 1})
    >>> partialstore.finalize(path)
    >>> data = info_json(path, partialstore.metadata(path))
    >>> data["bytes"], [leaf["path"] for leaf in data["leaves"]]
    (24, ['step', 'w'])
    >>> data["leaves"][1]["sharding"] is None  # a numpy array: no sharding recorded
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from partialstore._arrays.dtypes import dtype_from_name
from partialstore._cli.output import human_bytes, to_json
from partialstore._commit.loading import CheckpointMetadata, LeafMetadata

__all__ = ["info_json", "leaf_nbytes", "render_info", "walk"]


def leaf_nbytes(leaf: LeafMetadata) -> int:
    """Bytes of an array leaf's data (0 for inline values stored in the manifest).

    Example:
        >>> leaf_nbytes(LeafMetadata("array", (2, 3), "bfloat16"))
        12
    """
    if leaf.dtype is None:
        return 0
    return math.prod(leaf.shape) * dtype_from_name(leaf.dtype).itemsize


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def walk(tree: Any, prefix: str = "") -> Iterator[tuple[str, LeafMetadata]]:
    """``(key path, leaf)`` for every leaf of a metadata tree, depth first in stored order.

    Dict keys are joined with ``/``, sequence positions read ``[i]``.

    Example:
        >>> leaf = LeafMetadata("int", (), None)
        >>> [path for path, _ in walk({"a": [leaf, {"b": leaf}]})]
        ['a[0]', 'a[1]/b']
    """
    if isinstance(tree, LeafMetadata):
        yield prefix or "<root>", tree
    elif isinstance(tree, dict):
        for key, child in tree.items():
            yield from walk(child, _join(prefix, str(key)))
    elif isinstance(tree, list | tuple):
        for i, child in enumerate(tree):
            yield from walk(child, f"{prefix}[{i}]")


def _leaf_json(path: str, leaf: LeafMetadata) -> dict[str, Any]:
    return {
        "path": path,
        "kind": leaf.kind,
        "shape": list(leaf.shape),
        "dtype": leaf.dtype,
        "bytes": leaf_nbytes(leaf),
        "sharding": None if leaf.sharding is None else leaf.sharding.encode(),
    }


def info_json(path: str, meta: CheckpointMetadata) -> dict[str, Any]:
    """The ``--json`` form of ``info``: counts, every leaf, saves and custom metadata."""
    leaves = [_leaf_json(p, leaf) for p, leaf in walk(meta.tree)]
    return {
        "path": path,
        "finalized": meta.finalized,
        "leaves": leaves,
        "num_leaves": len(leaves),
        "bytes": sum(leaf["bytes"] for leaf in leaves),
        "saves": to_json(meta.saves),
        "custom_metadata": to_json(meta.custom_metadata),
    }


def _label(name: str, leaf: LeafMetadata) -> str:
    """One leaf's line in the tree; its saved sharding, if any, in words after its size.

    Example:
        >>> from partialstore._pytree.shardings import SavedSharding
        >>> saved = SavedSharding((2, 4), ("data", "model"), (None, "model"))
        >>> label = _label("w", LeafMetadata("jax_array", (8, 8), "float32", saved))
        >>> label.split("  ")[:2]
        ['[bold]w[/]: float32[8x8]', '256 B']
        >>> label.split("  sharded: ")[1]
        "mesh {'data': 2, 'model': 4} (8 devices), spec (None, 'model')"
    """
    if leaf.dtype is None:
        return f"[bold]{escape(name)}[/]: {leaf.kind}"
    shape = "x".join(map(str, leaf.shape)) or "scalar"
    label = f"[bold]{escape(name)}[/]: {leaf.dtype}[{shape}]  {human_bytes(leaf_nbytes(leaf))}"
    if leaf.sharding is not None:
        label += f"  sharded: {escape(leaf.sharding.describe())}"
    return label


def _grow(node: Tree, tree: Any) -> None:
    """Add ``tree``'s children under ``node``: containers as branches, leaves as labels."""
    if isinstance(tree, dict):
        children: list[tuple[str, Any]] = [(str(k), v) for k, v in tree.items()]
    else:
        children = [(f"[{i}]", v) for i, v in enumerate(tree)]
    for name, child in children:
        if isinstance(child, LeafMetadata):
            node.add(_label(name, child))
        elif isinstance(child, dict | list | tuple):
            _grow(node.add(f"[bold]{escape(name)}[/]"), child)


def _saves_table(saves: list[dict[str, Any]]) -> Table:
    table = Table(title="saves", title_justify="left")
    for column in ("#", "save_id", "created", "leaves"):
        table.add_column(column, overflow="fold")
    for i, save in enumerate(saves):
        table.add_row(
            str(i),
            escape(str(save.get("save_id"))),
            escape(str(save.get("created"))),
            str(save.get("num_leaves")),
        )
    return table


def render_info(
    console: Console, path: str, meta: CheckpointMetadata, data: dict[str, Any]
) -> None:
    """Print ``info`` for people: the tree, the saves table, the custom metadata."""
    console.print(f"[bold]{escape(path)}[/]")
    console.print(
        f"{data['num_leaves']} leaves, {human_bytes(data['bytes'])} of arrays, "
        f"{len(meta.saves)} saves, finalized {meta.finalized}"
    )
    root = Tree("[bold]<root>[/]")
    if isinstance(meta.tree, LeafMetadata):
        root.add(_label("<root>", meta.tree))
    elif isinstance(meta.tree, dict | list | tuple):
        _grow(root, meta.tree)
    # Wrapped inside the tree's guides: the console soft-wraps (for JSON and
    # long paths), which would crop a long label (a sharding) at the width.
    console.print(root, soft_wrap=False)
    console.print(_saves_table(meta.saves))
    custom = json.dumps(data["custom_metadata"], indent=2, sort_keys=True)
    console.print("custom_metadata: " + escape(custom))
