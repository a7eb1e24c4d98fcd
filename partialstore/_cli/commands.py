"""The commands on one checkpoint path: ``info``, ``verify``, ``gc``, ``discard``.

Each is a function registered with :func:`~partialstore._cli.framework.command`
and goes through partialstore's public API only; the rendering of ``info``
lives in :mod:`partialstore._cli.rendering`.

Example:
    >>> from partialstore._cli.framework import COMMANDS
    >>> [name for name in ("info", "verify", "gc", "discard") if name in COMMANDS]
    ['info', 'verify', 'gc', 'discard']
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

import partialstore
from partialstore._cli import exitcodes
from partialstore._cli.framework import command
from partialstore._cli.output import Output, human_bytes

__all__: list[str] = []


def _path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint path or URL (local, s3://, gs://, memory://...)")


@command("info", "show a checkpoint's tree, shapes, dtypes, bytes, saves", arguments=_path)
def info(args: argparse.Namespace, out: Output) -> int:
    """``partialstore info PATH``: what a finalized checkpoint holds (reads no array bytes)."""
    from partialstore._cli import rendering  # imports numpy and TensorStore: only when needed

    meta = partialstore.metadata(args.path, storage_options=args.storage_options)
    data = rendering.info_json(args.path, meta)
    out.result(data, lambda console: rendering.render_info(console, args.path, meta, data))
    return exitcodes.OK


def _verify_json(report: partialstore.VerifyReport) -> dict[str, Any]:
    return {
        "path": report.path,
        "ok": report.ok,
        "leaves": report.leaves,
        "arrays": report.arrays,
        "bytes": report.nbytes,
        "damaged": [{"path": d.path, "reason": d.reason} for d in report.damaged],
        "unchecksummed": report.unchecksummed,
    }


def _render_verify(console: Console, report: partialstore.VerifyReport) -> None:
    checked = f"{report.arrays} arrays, {human_bytes(report.nbytes)} of {report.leaves} leaves"
    if report.unchecksummed:
        console.print(
            f"{len(report.unchecksummed)} array leaves have no checksum (saved without one): their "
            "chunks were read and decoded, but a changed bit in them cannot be detected: "
            + ", ".join(report.unchecksummed),
            markup=False,
        )
    if report.ok:
        console.print(f"OK: {report.path}: read {checked}; every checksum matches.", markup=False)
        return
    console.print(
        f"DAMAGED: {report.path}: {len(report.damaged)} damaged leaves (read {checked}):",
        markup=False,
    )
    for damaged in report.damaged:
        console.print(f"  {damaged.path}: {damaged.reason}", markup=False)


@command("verify", "read every byte of a checkpoint and check every checksum", arguments=_path)
def verify(args: argparse.Namespace, out: Output) -> int:
    """``partialstore verify PATH``: exit 0 if every byte matches, 1 listing damaged leaves."""
    with out.progress("verifying") as advance:
        report = partialstore.verify(
            args.path, storage_options=args.storage_options, progress=advance
        )
    out.result(_verify_json(report), lambda console: _render_verify(console, report))
    return exitcodes.OK if report.ok else exitcodes.DAMAGED


@command("gc", "delete data a finalized checkpoint does not use", arguments=_path)
def gc(args: argparse.Namespace, out: Output) -> int:
    """``partialstore gc PATH``: delete unused save directories; list them."""
    deleted = partialstore.gc(args.path, storage_options=args.storage_options)

    def render(console: Console) -> None:
        console.print(f"{args.path}: deleted {len(deleted)} unused save directories", markup=False)
        for name in deleted:
            console.print(f"  {name}", markup=False)

    out.result({"path": args.path, "deleted": deleted}, render)
    return exitcodes.OK


@command("discard", "abandon an unfinalized session and delete its data", arguments=_path)
def discard(args: argparse.Namespace, out: Output) -> int:
    """``partialstore discard PATH``: discard the open session (never a finalized checkpoint)."""
    partialstore.discard(args.path, storage_options=args.storage_options)
    out.result(
        {"path": args.path, "discarded": True},
        lambda console: console.print(f"{args.path}: session discarded", markup=False),
    )
    return exitcodes.OK
