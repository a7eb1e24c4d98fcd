"""The ``partialstore`` console script, run for real in a subprocess on local disk and S3.

Checkpoints are made with the library in this process; the command runs in
a child (the installed console script beside this interpreter), whose stdout,
stderr and exit status are checked. Damage is done behind the backend's back:
by editing files on local disk, by plain boto3 requests on S3 (moto).
Known errors must print exactly one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

import partialstore
from partialstore._cli import cli, exitcodes
from partialstore._cli.framework import COMMANDS, command
from partialstore._cli.output import Output
from partialstore.errors import NotFoundError

SCRIPT = Path(sys.executable).with_name("partialstore")
README = Path(__file__).resolve().parent.parent / "README.md"
#: Generous: a command that hangs must fail the test, not the session.
TIMEOUT = 120


def run_cli(*args: str, options: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script with ``args`` (and ``--storage-options`` if given)."""
    assert SCRIPT.exists(), f"console script missing: {SCRIPT}"
    argv = [str(SCRIPT), *args]
    if options:
        argv += ["--storage-options", json.dumps(options)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit ``code``, nothing on stdout, one ``partialstore: error:`` line, no traceback."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("partialstore: error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def state() -> dict[str, Any]:
    """A zarr3 leaf (2 MiB), packed leaves and inline values."""
    return {
        "params": {
            "w": np.arange(512 * 1024, dtype=np.float32).reshape(512, 1024),
            "b": np.arange(3, dtype=np.float64),
        },
        "opt": [np.ones(5, np.int32), 1.5],
        "name": "run-7",
    }


def make_checkpoint(path: str, options: dict[str, Any] | None = None) -> str:
    partialstore.save(path, state(), custom_metadata={"lr": 0.1}, storage_options=options)
    partialstore.finalize(path, storage_options=options)
    return path


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """``(root, storage_options)`` on local disk or on a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "root"), {}
    url, options = request.getfixturevalue("s3_url")
    return url, options


# -- framework --------------------------------------------------------------------


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"partialstore {partialstore.__version__}"


def test_help_documents_every_exit_code_and_the_readme_agrees() -> None:
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    readme = README.read_text()
    for code, meaning in exitcodes.TABLE:
        assert re.search(rf"^\s+{code}\s+{re.escape(meaning)}$", done.stdout, re.M), code
        assert f"| {code} |" in readme, f"exit code {code} missing from README"
    for name in ("info", "verify", "gc", "discard", "demo"):
        assert name in done.stdout


def test_usage_error_exits_2() -> None:
    done = run_cli("no-such-command")
    assert done.returncode == exitcodes.USAGE
    assert "invalid choice" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def scratch_command() -> Any:
    """Register commands for one test, removing them afterwards."""
    added: list[str] = []

    def add(name: str, failure: BaseException) -> None:
        @command(name, "raises for a test")
        def run(args: argparse.Namespace, out: Output) -> int:
            raise failure

        added.append(name)

    yield add
    for name in added:
        del COMMANDS[name]


def test_unexpected_error_is_one_line_and_traceback_only_with_verbose(
    scratch_command: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    scratch_command("boom", ZeroDivisionError("division by zero"))
    assert cli.main(["boom"]) == exitcodes.INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "-v" in err
    assert cli.main(["boom", "-v"]) == exitcodes.INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("partialstore: error: ZeroDivisionError") and "Traceback" in err


def test_known_error_never_prints_a_traceback_even_verbose(
    scratch_command: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    scratch_command("missing", NotFoundError("No finalized checkpoint at /x."))
    assert cli.main(["-v", "missing"]) == exitcodes.NOT_FOUND
    assert capsys.readouterr().err == "partialstore: error: No finalized checkpoint at /x.\n"


def test_keyboard_interrupt_exits_130(
    scratch_command: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    scratch_command("interrupted", KeyboardInterrupt())
    assert cli.main(["interrupted"]) == exitcodes.INTERRUPTED == 130
    assert capsys.readouterr().err == "partialstore: error: interrupted\n"


# -- commands ---------------------------------------------------------------------


def test_info(store: tuple[str, dict[str, Any]]) -> None:
    root, options = store
    path = make_checkpoint(f"{root}/step_1", options)
    done = run_cli("info", path, "--json", options=options)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    leaves = {leaf["path"]: leaf for leaf in info["leaves"]}
    assert leaves["params/w"] == {
        "path": "params/w",
        "kind": "array",
        "shape": [512, 1024],
        "dtype": "float32",
        "bytes": 2 << 20,
        "sharding": None,
    }
    assert leaves["opt[0]"]["dtype"] == "int32" and leaves["opt[0]"]["bytes"] == 20
    assert leaves["name"]["kind"] == "str" and leaves["opt[1]"]["kind"] == "float"
    assert info["bytes"] == (2 << 20) + 24 + 20 and info["num_leaves"] == 5
    assert info["custom_metadata"] == {"lr": 0.1} and len(info["saves"]) == 1
    if options:
        return  # the human form is the same on every store: checked on local disk
    human = run_cli("info", path)
    assert human.returncode == 0, human.stderr
    assert "float32[512x1024]" in human.stdout and "2.0 MiB" in human.stdout
    assert '"lr": 0.1' in human.stdout


def test_verify_passes_on_a_sound_checkpoint(store: tuple[str, dict[str, Any]]) -> None:
    root, options = store
    path = make_checkpoint(f"{root}/step_1", options)
    done = run_cli("--json", "verify", path, options=options)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["damaged"] == []
    assert report["arrays"] == 3 and report["bytes"] == (2 << 20) + 24 + 20
    if not options:  # the human form is the same on every store: checked on local disk
        human = run_cli("verify", path)
        assert human.returncode == 0 and human.stdout.startswith("OK: ")


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_verify_names_each_damaged_leaf_on_local_disk(tmp_path: Path) -> None:
    path = make_checkpoint(str(tmp_path / "step_1"))
    # One bit of the zarr3 leaf's only chunk, one bit of the packed opt[0] (int32[5]).
    (chunk,) = (p for p in Path(path).glob("data/*/a*/c/**/*") if p.is_file())
    chunk.write_bytes(_flip(chunk.read_bytes(), 1000))
    manifest = json.loads((Path(path) / "partialstore.json").read_text())
    (opt0,) = (e["data"] for e in manifest["leaves"] if e.get("data", {}).get("shape") == [5])
    pack = Path(path) / opt0["path"]
    pack.write_bytes(_flip(pack.read_bytes(), opt0["offset"] + 2))
    done = run_cli("verify", path, "--json")
    assert done.returncode == exitcodes.DAMAGED, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert [d["path"] for d in report["damaged"]] == ["opt[0]", "params/w"]
    assert all("damaged" in d["reason"] for d in report["damaged"])
    human = run_cli("verify", path)
    assert human.returncode == exitcodes.DAMAGED and "Traceback" not in human.stderr
    assert "DAMAGED" in human.stdout and "params/w" in human.stdout
    assert "params/b" not in human.stdout


def test_verify_finds_a_chunk_replaced_on_s3(s3_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_url
    path = make_checkpoint(f"{url}/step_1", options)
    bucket = path.removeprefix("s3://").split("/")[0]
    client = _boto3(options)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    (chunk,) = (k for k in keys if re.search(r"/a\d+/c/", k))
    body = client.get_object(Bucket=bucket, Key=chunk)["Body"].read()
    client.put_object(Bucket=bucket, Key=chunk, Body=_flip(body, 4096))
    done = run_cli("verify", path, options=options)
    assert done.returncode == exitcodes.DAMAGED, done.stderr
    assert "params/w" in done.stdout and "Traceback" not in done.stderr


@functools.cache
def _boto3_client(endpoint: str, key: str, secret: str, region: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=region,
    )


def _boto3(options: dict[str, Any]) -> Any:
    region = options["client_kwargs"]["region_name"]
    return _boto3_client(options["endpoint_url"], options["key"], options["secret"], region)


def test_gc_deletes_replaced_data(store: tuple[str, dict[str, Any]]) -> None:
    root, options = store
    path = f"{root}/step_1"
    partialstore.save(path, {"w": np.zeros(3)}, storage_options=options)
    partialstore.save(path, {"w": np.ones(3)}, storage_options=options)  # replaces it all
    partialstore.finalize(path, storage_options=options)
    done = run_cli("gc", path, "--json", options=options)
    assert done.returncode == 0, done.stderr
    (deleted,) = json.loads(done.stdout)["deleted"]
    assert deleted.startswith("data/")
    assert partialstore.gc(path, storage_options=options) == []  # it is gone already
    loaded = partialstore.load(path, storage_options=options)
    assert loaded["w"].tolist() == [1.0, 1.0, 1.0]


def test_discard_abandons_the_session(store: tuple[str, dict[str, Any]]) -> None:
    root, options = store
    path = f"{root}/step_1"
    partialstore.save(path, {"w": np.zeros(3)}, storage_options=options)
    done = run_cli("discard", path, options=options)
    assert done.returncode == 0, done.stderr
    assert "discarded" in done.stdout
    with pytest.raises(NotFoundError, match="No partial save session"):
        partialstore.finalize(path, storage_options=options)


def test_demo_json_prints_only_its_timings(tmp_path: Path) -> None:
    done = run_cli("demo", str(tmp_path / "run"), "--scale", "0", "--json")
    assert done.returncode == 0, done.stderr
    seconds = json.loads(done.stdout)["seconds"]  # the whole of stdout is one document
    assert {"job until killed", "resume (recover + load)", "check (load + verify)"} <= set(seconds)
    assert all(value > 0 for value in seconds.values())
    with partialstore.CheckpointManager(str(tmp_path / "run")) as manager:
        assert manager.metadata().custom_metadata == {"loss": 1 / manager.latest_step()}


# -- one test per error exit code --------------------------------------------------


def test_missing_checkpoint_exits_not_found(store: tuple[str, dict[str, Any]]) -> None:
    root, options = store
    done = run_cli("info", f"{root}/nothing", "--json", options=options)
    assert_one_line_error(done, exitcodes.NOT_FOUND, "No finalized checkpoint")


def test_unfinalized_checkpoint_exits_not_finalized_and_says_finalize(tmp_path: Path) -> None:
    path = str(tmp_path / "step_1")
    partialstore.save(path, {"w": np.zeros(3)})
    done = run_cli("verify", path)
    assert_one_line_error(done, exitcodes.NOT_FINALIZED, "finalize first")


def test_discarding_a_finalized_checkpoint_exits_exists(tmp_path: Path) -> None:
    path = make_checkpoint(str(tmp_path / "step_1"))
    done = run_cli("discard", path)
    assert_one_line_error(done, exitcodes.EXISTS, "finalized checkpoint")
    assert partialstore.load(path)["name"] == "run-7"


def test_damaged_manifest_exits_corrupt(tmp_path: Path) -> None:
    path = make_checkpoint(str(tmp_path / "step_1"))
    manifest = Path(path) / "partialstore.json"
    manifest.write_bytes(manifest.read_bytes()[:-20])  # truncated
    done = run_cli("verify", path)
    assert_one_line_error(done, exitcodes.CORRUPT, "partialstore.json")


@pytest.mark.parametrize("text", ["{not json", '["a list"]'])
def test_bad_storage_options_exit_invalid(tmp_path: Path, text: str) -> None:
    done = run_cli("info", str(tmp_path / "x"), "--storage-options", text)
    assert_one_line_error(done, exitcodes.INVALID, "--storage-options", "JSON object")


def test_unknown_storage_option_exits_invalid(s3_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_url
    done = run_cli("info", f"{url}/x", options={**options, "endpont_url": "http://x"})
    assert_one_line_error(done, exitcodes.INVALID, "endpont_url")


def test_unreachable_endpoint_exits_backend(moto_server: Any, tmp_path: Path) -> None:
    from partialstore.testing.servers import free_port

    options = {**moto_server.storage_options(), "deadline": 10, "retries": 1}
    options["endpoint_url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = run_cli("verify", "s3://bucket/step_1", options=options)
    assert_one_line_error(done, exitcodes.BACKEND, "cannot be reached")


def test_verify_draws_a_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    path = str(tmp_path / "step_1")
    partialstore.save(path, {"w": np.ones((2048, 2048), np.float32)})  # 16 MiB
    partialstore.finalize(path)
    controller, terminal = pty.openpty()
    with subprocess.Popen(
        [str(SCRIPT), "verify", path], stdout=subprocess.PIPE, stderr=terminal
    ) as child:
        os.close(terminal)
        drawn = b""
        while chunk := _read_pty(controller):
            drawn += chunk
        stdout, _ = child.communicate(timeout=TIMEOUT)
    os.close(controller)
    assert child.returncode == 0 and stdout.startswith(b"OK: ")
    assert b"verifying" in drawn and b"MiB" in drawn  # rich's bar, on stderr
    piped = run_cli("verify", path)  # stderr is a pipe here: no bar
    assert piped.returncode == 0 and piped.stderr == ""


def _read_pty(fd: int) -> bytes:
    """Read what the child wrote to its terminal; b"" once it has closed it."""
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the child closed its end
        return b""
