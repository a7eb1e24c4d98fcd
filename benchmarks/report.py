"""Output of a benchmark run: progress bar, markdown tables, JSON and PNG plots.

- :class:`ProgressBar` draws on stderr (redrawn in place on a terminal, one
  line per step otherwise, so CI logs stay readable).
- :func:`markdown_table` renders rows for stdout and the README.
- :func:`write_json` stores every raw figure with the machine description.
- :func:`plot_finalize_scaling` and :func:`plot_throughput` draw the PNGs
  with matplotlib's Agg backend (no display needed).

Example::

    bar = ProgressBar(total=3, label="finalize")
    bar.step("local bytes 1 MiB")
    print(markdown_table(["a", "b"], [["1", "2"]]))
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from benchmarks.common import GiB, MiB


class ProgressBar:
    """A small text progress bar with elapsed time, written to stderr.

    Example::

        bar = ProgressBar(total=10, label="throughput")
        for i in range(10):
            bar.step(f"item {i}")
        bar.close()
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 28):
        self.total = max(1, total)
        self.done = 0
        self.label = label
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._draw("starting")

    def _draw(self, note: str) -> None:
        filled = int(self.width * min(self.done, self.total) / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.started
        text = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:6.1f}s {note}"
        if self.interactive:
            self.stream.write("\r\033[K" + text[:200])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, note: str = "", count: int = 1) -> None:
        """Advance by ``count`` and show ``note``."""
        self.done += count
        self._draw(note)

    def grow(self, count: int) -> None:
        """Add ``count`` to the total (work discovered while running)."""
        self.total += count

    def close(self) -> None:
        self.done = max(self.done, self.total)
        self._draw("done")
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; ``|`` inside cells is escaped.

    Example::

        markdown_table(["x"], [[1]])  # '| x |\\n|---|\\n| 1 |'
    """

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines.extend("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; store them as null rather than writing invalid JSON.
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as indented, strictly valid JSON (NaN becomes null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(_clean(data), handle, indent=2, sort_keys=False, allow_nan=False)
        handle.write("\n")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_STYLE = {
    "partialstore": "-",
    "orbax": "--",
    "tensorstore": ":",
    "tensorstore-per-save": (0, (1, 3)),
    "numpy": "-.",
}
_MARKER = {"local": "o", "s3": "s", "gcs": "^"}


def plot_finalize_scaling(
    points: list[dict[str, Any]],
    floors: dict[str, float],
    series_axes: dict[str, tuple[str, str]],
    path: str,
    title: str,
) -> None:
    """Log-log finalize latency against each series' x value, one line per system and store.

    Args:
      points: ``finalize_point`` results with ``status``, ``system``, ``store``,
        ``series``, ``x`` and ``finalize`` stats.
      floors: median floor (create + list) per store, drawn as a dotted line.
      series_axes: ``{series: (x field label, x scale kind "bytes"|"count")}``.
    """
    plt = _pyplot()
    names = [s for s in series_axes if any(p["series"] == s for p in points)]
    if not names:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no scaling series in this run", ha="center", va="center")
        fig.suptitle(title, fontsize=10)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.4), squeeze=False)
    for ax, series in zip(axes[0], names, strict=True):
        label, kind = series_axes[series]
        lines: dict[tuple[str, str], list[tuple[float, dict[str, Any]]]] = {}
        for p in points:
            if p["series"] == series and p.get("status") == "ok":
                lines.setdefault((p["system"], p["store"]), []).append((p["x"], p["finalize"]))
        for (system, store), values in sorted(lines.items()):
            values.sort(key=lambda v: v[0])
            xs = [v[0] / MiB if kind == "bytes" else v[0] for v in values]
            med = [v[1]["median"] for v in values]
            low = [v[1]["median"] - v[1]["min"] for v in values]
            high = [v[1]["max"] - v[1]["median"] for v in values]
            ax.errorbar(
                xs,
                med,
                yerr=[low, high],
                linestyle=_STYLE.get(system, "-"),
                marker=_MARKER.get(store, "o"),
                capsize=2,
                label=f"{system} / {store}",
            )
        for i, (store, floor) in enumerate(sorted(floors.items())):
            if floor and floor > 0:
                ax.axhline(floor, color=f"C{i + 6}", linestyle=":", linewidth=1)
                ax.annotate(f"{store} floor", (0.02, floor), xycoords=("axes fraction", "data"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label + (" (MiB)" if kind == "bytes" else ""))
        ax.set_ylabel("finalize latency (s), median with min-max")
        ax.set_title(f"against {series}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(results: list[dict[str, Any]], path: str, title: str) -> None:
    """Save and load throughput (MiB/s, log scale) per workload, one bar per system and store."""
    plt = _pyplot()
    ok = [r for r in results if r.get("status") == "ok"]
    workloads = sorted({r["workload"]["name"] for r in ok}) or ["(none)"]
    combos = sorted({(r["system"], r["store"]) for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), squeeze=False)
    width = 0.8 / max(1, len(combos))
    for ax, (field, label) in zip(
        axes[0], (("save_plus_finalize", "save + finalize"), ("load", "load")), strict=True
    ):
        for k, combo in enumerate(combos):
            xs, ys = [], []
            for i, name in enumerate(workloads):
                for r in ok:
                    if (r["system"], r["store"]) == combo and r["workload"]["name"] == name:
                        seconds = (r.get(field) or {}).get("median")
                        if seconds:
                            xs.append(i + k * width)
                            ys.append(r["workload"]["total_bytes"] / MiB / seconds)
            ax.bar(xs, ys, width=width, label=f"{combo[0]} / {combo[1]}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads)
        ax.set_yscale("log")
        ax.set_ylabel(f"{label} throughput (MiB/s, median)")
        ax.set_xlabel("workload")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def orbax_status(
    stores: list[str],
    systems: list[str],
    events: list[dict[str, Any]],
    unavailable: dict[tuple[str, str], str],
) -> dict[str, str | None]:
    """``{store: None if Orbax ran there, else why not}`` from this run's probes."""
    if "orbax" not in systems:
        return {}
    probed = {e["store"]: e.get("reason") for e in events if e.get("type") == "probe"}
    return {
        store: unavailable.get((store, "orbax")) or probed.get(store) or None for store in stores
    }


def orbax_table(reasons: dict[str, str | None]) -> str:
    """Whether stock Orbax ran on each store, and if not, what happened (from the probe)."""
    rows = [
        [store, "runs" if not reason else "does not run", reason or ""]
        for store, reason in reasons.items()
    ]
    return markdown_table(["store", "Orbax", "what the probe in this run saw"], rows)


def describe_size(count: int) -> str:
    """Compact size label for table rows (``1 GiB``, ``16 MiB``, ``4 KiB``)."""
    if count >= GiB and count % GiB == 0:
        return f"{count // GiB} GiB"
    if count >= MiB and count % MiB == 0:
        return f"{count // MiB} MiB"
    if count >= 1024 and count % 1024 == 0:
        return f"{count // 1024} KiB"
    return f"{count} B"
