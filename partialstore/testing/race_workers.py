"""Child processes for the conformance suite's cross-process races.

Each worker is a fresh interpreter (``python -m partialstore.testing.race_workers``)
that opens its own backend from the pickled ``(url, storage_options)``,
exactly like a second host would. Plain subprocesses start faster than
``multiprocessing``'s spawn (which re-imports the parent's ``__main__``,
pytest included) and need nothing but pipes.

Protocol, one line each way: the parent sends the pickled job (base64) on
stdin. At every barrier the worker prints ``ready`` and waits for ``go``;
the parent sends ``go`` to all workers only when all are ready, so their
operations start together. At the end the worker prints ``result <base64
pickle>``, or ``error <base64 traceback>`` at any point.

What the suite does, on a local root:

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> records = run_workers("create", f"{tmp.name}/root", {}, count=2,
    ...                       keys=["k/0", "k/1"], size=1024)
    >>> [sorted(record[i] for record in records) for i in range(2)]  # one winner per key
    [['lost', 'won'], ['lost', 'won']]
    >>> tmp.cleanup()
"""

from __future__ import annotations

import base64
import hashlib
import pickle
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import Any

__all__ = ["RaceWorkerError", "exists_in_other_process", "race_payload", "run_workers"]

# Longest wait for all workers at one barrier, and for their results.
BARRIER_TIMEOUT_S = 120.0


class RaceWorkerError(RuntimeError):
    """A worker process failed or stopped answering; carries its traceback."""


def race_payload(worker: int, round_: int, size: int) -> bytes:
    """Deterministic bytes unique to ``(worker, round_)``, so any process can recompute them.

    Example:
        >>> race_payload(0, 3, 1024)[:16]  # the same bytes in every process
        b'worker=0 round=3'
        >>> len(race_payload(0, 3, 1024))
        1024
    """
    header = f"worker={worker} round={round_};".encode()
    block = hashlib.sha256(header).digest()
    body_len = max(size - len(header), 0)
    body = (block * (body_len // len(block) + 1))[:body_len]
    return header + body


def _encode(value: Any) -> str:
    return base64.b64encode(pickle.dumps(value)).decode()


def _decode(text: str) -> Any:
    return pickle.loads(base64.b64decode(text))


# ----------------------------------------------------------------- parent side


def _barriers(kind: str, job: Mapping[str, Any]) -> int:
    return len(job["keys"]) if kind == "create" else 2 * job["rounds"]


def run_workers(
    kind: str, url: str, storage_options: Mapping[str, Any], *, count: int, **job: Any
) -> list[Any]:
    """Run ``count`` workers of ``kind`` (``"create"`` or ``"cas"``); return records by worker.

    ``job`` holds the kind's parameters: ``keys`` and ``size`` for
    ``"create"``; ``key`` and ``rounds`` for ``"cas"``.

    Raises:
      RaceWorkerError: a worker failed, exited, or missed a barrier.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "partialstore.testing.race_workers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]

    # A hung worker would block readline forever; the watchdog kills them all.
    def kill_all() -> None:
        for proc in procs:
            proc.kill()

    watchdog = threading.Timer(BARRIER_TIMEOUT_S * 4, kill_all)
    watchdog.start()
    try:
        for worker, proc in enumerate(procs):
            spec = {"kind": kind, "url": url, "options": dict(storage_options), "worker": worker}
            _send(proc, _encode({**spec, **job}))
        for _ in range(_barriers(kind, job)):
            for worker, proc in enumerate(procs):
                _expect(proc, worker, "ready")
            for proc in procs:
                _send(proc, "go")
        return [_decode(_expect(proc, w, "result")) for w, proc in enumerate(procs)]
    finally:
        watchdog.cancel()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def _send(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    except BrokenPipeError:
        pass  # the worker died; _expect reports its error


def _expect(proc: subprocess.Popen[str], worker: int, word: str) -> str:
    assert proc.stdout is not None
    while True:
        raw = proc.stdout.readline()
        line = raw.rstrip("\n")
        head, _, rest = line.partition(" ")
        if head == word:
            return rest
        if head == "error":
            raise RaceWorkerError(f"race worker {worker} failed:\n{_decode(rest)}")
        if not raw:
            break
        # Anything else is stray output of a library in the worker; skip it.
    raise RaceWorkerError(
        f"race worker {worker} exited (code {proc.poll()}) before sending {word!r}"
    )


# ------------------------------------------------------------------ child side


def _barrier() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("race worker: parent went away")


def _create_job(backend: Any, job: Mapping[str, Any]) -> list[str]:
    """Race ``create`` on each key; per key ``won``/``lost``/``error: ...``."""
    from partialstore._runtime.aio import run
    from partialstore.errors import AlreadyExistsError, UnsupportedOperationError

    records: list[str] = []
    for round_, key in enumerate(job["keys"]):
        payload = race_payload(job["worker"], round_, job["size"])
        _barrier()
        try:
            run(backend.create(key, payload))
            records.append("won")
        except AlreadyExistsError:
            records.append("lost")
        except UnsupportedOperationError:
            records.append("refused")
        except Exception as exc:  # reported to the parent, which fails the test
            records.append(f"error: {exc!r}")
    return records


def _cas_job(backend: Any, job: Mapping[str, Any]) -> list[tuple[int, str, str]]:
    """Race versioned writes on one key; per round ``(round, sha256 read, outcome)``."""
    from partialstore._runtime.aio import run
    from partialstore.errors import ConflictError, UnsupportedOperationError

    records: list[tuple[int, str, str]] = []
    for round_ in range(job["rounds"]):
        _barrier()
        try:
            data, version = run(backend.read_versioned(job["key"]))
        except UnsupportedOperationError:
            # No compare-and-swap: the conditional write below must be refused too.
            data, version = b"", "unsupported"
        # Everyone holds the same version before anyone writes.
        _barrier()
        payload = race_payload(job["worker"], round_, 4096)
        try:
            run(backend.write(job["key"], payload, if_version=version))
            outcome = "won"
        except ConflictError:
            outcome = "lost"
        except UnsupportedOperationError:
            outcome = "refused"
        except Exception as exc:  # reported to the parent, which fails the test
            outcome = f"error: {exc!r}"
        records.append((round_, hashlib.sha256(data).hexdigest(), outcome))
    return records


def exists_in_other_process(url: str, storage_options: Mapping[str, Any], key: str) -> bool:
    """Whether a fresh process that opens ``url`` sees ``key`` (for process-local stores).

    Example:
        >>> exists_in_other_process("memory://x", {}, "k")  # memory is per process
        False
    """
    proc = subprocess.run(
        [sys.executable, "-m", "partialstore.testing.race_workers"],
        input=_encode({"kind": "exists", "url": url, "options": dict(storage_options), "key": key})
        + "\n",
        capture_output=True,
        text=True,
        timeout=BARRIER_TIMEOUT_S,
        check=False,
    )
    for line in proc.stdout.splitlines():
        head, _, rest = line.partition(" ")
        if head == "result":
            return bool(_decode(rest))
        if head == "error":
            raise RaceWorkerError(f"exists worker failed:\n{_decode(rest)}")
    raise RaceWorkerError(f"exists worker exited (code {proc.returncode}) without a result")


def main() -> None:
    """Worker entry point: read the job, run it in step with the parent, print the result."""
    try:
        from partialstore import registry
        from partialstore._runtime.aio import run

        job = _decode(sys.stdin.readline())
        backend = registry.open_backend(job["url"], job["options"])
        if job["kind"] == "exists":
            records: Any = run(backend.exists(job["key"]))
        else:
            records = (_create_job if job["kind"] == "create" else _cas_job)(backend, job)
        run(backend.close())
        print("result " + _encode(records), flush=True)
    except BaseException:
        print("error " + _encode(traceback.format_exc()), flush=True)
        raise


if __name__ == "__main__":
    main()
