"""``partialstore demo``: a training job that checkpoints every step, is killed, and resumes.

1. The job (:mod:`partialstore._cli.demo_job`) starts in a child process and
   checkpoints each step through a :class:`partialstore.CheckpointManager`:
   four partial saves (two async), one finalize, retention keeping the last
   two steps.
2. In the middle of step :data:`KILL_AT` the demo kills it with SIGKILL.
3. It resumes the job in its own process: ``recover()`` names the latest
   finalized step, whose state must load back bit for bit; the job goes on
   to the last step, saving the killed step again.
4. It checks the run: the retained steps, every byte of the latest one
   against the state recomputed from scratch, and every checksum of each
   retained step (``partialstore.verify``). It prints its figures per phase.

From a shell: ``partialstore demo`` uses a temporary local folder,
``partialstore demo s3://bucket/run`` any URL (storage options via
``--storage-options``), and ``partialstore demo --emulator s3`` a moto S3
server it starts on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from partialstore._cli.demo_job import KEEP_LAST, same_bits, state_at, train

__all__ = ["KILL_AT", "LAST_STEP", "run_demo"]

#: The step in the middle of which the job is killed, and its last step.
KILL_AT, LAST_STEP = 3, 5


@contextlib.contextmanager
def _emulated(kind: str | None) -> Iterator[tuple[str | None, dict[str, Any]]]:
    if kind is None:
        yield None, {}
        return
    from partialstore.testing import servers

    server: servers.MotoS3Server | servers.FakeGcsServer = (
        servers.MotoS3Server() if kind == "s3" else servers.FakeGcsServer()
    )
    server.start()
    # TensorStore reads its GCS endpoint from the environment only (the job inherits it).
    saved_env = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())
    try:
        bucket = f"demo-{uuid.uuid4().hex[:12]}"
        server.create_bucket(bucket)
        scheme = "s3" if kind == "s3" else "gs"
        yield f"{scheme}://{bucket}/run", server.storage_options()
    finally:
        server.stop()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_and_kill(
    root: str, options: Mapping[str, Any], scale: int, echo: Callable[[str], object]
) -> None:
    """Run the job in a child process; SIGKILL it once it starts saving step KILL_AT."""
    command = [sys.executable, "-m", "partialstore._cli.demo_job", root]
    command += ["--last-step", str(LAST_STEP), "--scale", str(scale)]
    command += ["--options", json.dumps(dict(options))]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        for line in child.stdout:
            echo(f"  job: {line.rstrip()}")
            if line.startswith(f"step {KILL_AT}: saving"):
                child.send_signal(signal.SIGKILL)
                echo(f"  killed the job with SIGKILL while it saved step {KILL_AT}")
                break
    finally:
        child.kill()
        child.wait()
    if child.returncode != -signal.SIGKILL:
        raise AssertionError(f"the job ended with {child.returncode} before it could be killed")


def _check_run(root: str, options: Mapping[str, Any], scale: int) -> int:
    """Check the retained steps, the latest one's bytes and every checksum; return bytes read."""
    import partialstore

    with partialstore.CheckpointManager(root, storage_options=dict(options)) as manager:
        steps = manager.steps()
        expected_steps = list(range(LAST_STEP - KEEP_LAST + 1, LAST_STEP + 1))
        if steps != expected_steps:
            raise AssertionError(f"retained steps {steps}, expected {expected_steps}")
        if not same_bits(state_at(LAST_STEP, scale=scale), manager.load()):
            raise AssertionError(f"step {LAST_STEP} does not load back bit for bit")
        checked = 0
        for step in steps:
            report = partialstore.verify(manager.path(step), storage_options=dict(options))
            if not report.ok:
                raise AssertionError(f"step {step} is damaged: {report.damaged}")
            checked += report.nbytes
    return checked


def _resume(
    root: str, options: Mapping[str, Any], scale: int, echo: Callable[[str], object]
) -> dict[str, float]:
    """Resume the killed job here: check the recovered step's state, then train on."""
    import partialstore

    started = time.perf_counter()
    with partialstore.CheckpointManager(root, storage_options=dict(options)) as manager:
        recovered = manager.recover()
        loaded = manager.load()
    if recovered != KILL_AT - 1 or not same_bits(state_at(recovered, scale=scale), loaded):
        raise AssertionError(f"resumed from step {recovered}, not {KILL_AT - 1} bit for bit")
    figures = {"resume (recover + load)": time.perf_counter() - started}
    echo(f"  resumed from step {recovered}: its state loads back bit for bit")
    figures |= train(root, options, last_step=LAST_STEP, scale=scale, echo=lambda s: echo(f"  {s}"))
    return figures


def run_demo(
    url: str | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    emulator: str | None = None,
    scale: int = 1,
    echo: Callable[[str], object] = print,
) -> dict[str, float]:
    """Run the demo job on the run root ``url``; return the seconds each phase took.

    Raises:
      AssertionError: a step, a byte or a checksum is not what the job saved.
    """
    with contextlib.ExitStack() as stack:
        emulated_url, emulated_options = stack.enter_context(_emulated(emulator))
        if emulated_url is not None:
            url, storage_options = emulated_url, emulated_options
        if url is None:
            url = f"{stack.enter_context(tempfile.TemporaryDirectory())}/run"
        options = dict(storage_options or {})
        echo(f"partialstore demo: a training job checkpointing steps 1-{LAST_STEP} to {url}")
        started = time.perf_counter()
        _run_and_kill(url, options, scale, echo)
        timings = {"job until killed": time.perf_counter() - started}
        timings |= _resume(url, options, scale, echo)
        started = time.perf_counter()
        checked = _check_run(url, options, scale)
        timings["check (load + verify)"] = time.perf_counter() - started
        for phase, seconds in timings.items():
            echo(f"  {phase:28s}: {seconds * 1e3:8.1f} ms")
        echo(
            f"verified steps {LAST_STEP - KEEP_LAST + 1}-{LAST_STEP} ({checked / 2**20:.1f} MiB "
            "read, every checksum) and the latest state byte for byte: all equal"
        )
        return timings
