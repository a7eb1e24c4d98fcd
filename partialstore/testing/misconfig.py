"""Honest broken setups on this machine: a refused endpoint, a host that never resolves, no keys.

Used by the bounded-failure tests and ``benchmarks.time_to_error``; nothing
here reaches beyond 127.0.0.1.

- :func:`refused_endpoint`: an ``http://127.0.0.1:PORT`` nothing listens on.
- :data:`UNRESOLVABLE_ENDPOINT`: a host under ``.invalid`` (RFC 6761: such
  names never resolve, so no query leaves the machine with an answer).
- :func:`no_aws_credentials_env` / :func:`no_google_credentials_env`: the
  environment changes under which the client itself finds no credentials
  (the emulators accept any, so a missing key must be missing on the client
  side): credential variables removed, shared files and config folders
  empty, and instance-metadata lookups turned off, so the answer is "none
  found" at once instead of a wait on a metadata server that is not there.
  Each maps a variable to its new value, ``None`` meaning "unset"; apply them
  with :func:`applied_env` (a child process) or ``monkeypatch`` (a test).

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> env = applied_env(no_aws_credentials_env(tmp.name))  # os.environ with the changes
    >>> "AWS_ACCESS_KEY_ID" in env, env["AWS_EC2_METADATA_DISABLED"]
    (False, 'true')
    >>> tmp.cleanup()

A test then runs a child process with ``env=env``, or sets the same changes
with ``monkeypatch`` (see :func:`no_aws_credentials_env`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "UNRESOLVABLE_ENDPOINT",
    "applied_env",
    "no_aws_credentials_env",
    "no_google_credentials_env",
    "refused_endpoint",
]

UNRESOLVABLE_ENDPOINT = "http://partialstore-test.invalid:9000"

# Every way botocore (and TensorStore's AWS chain) could find keys or a role.
_AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)
# Every way google-auth (and TensorStore's GCS driver) could find a token.
_GOOGLE_CREDENTIAL_VARIABLES = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def refused_endpoint() -> str:
    """An ``http://127.0.0.1:PORT`` URL where nothing listens: connections are refused.

    Example:
        >>> refused_endpoint().startswith("http://127.0.0.1:")  # e.g. http://127.0.0.1:40123
        True
    """
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def no_aws_credentials_env(folder: str | os.PathLike[str]) -> dict[str, str | None]:
    """Environment changes under which botocore finds no AWS credentials.

    Writes empty ``credentials`` and ``config`` files into ``folder`` (they
    must exist: a missing shared file makes some clients look elsewhere).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import os
        >>> changes = no_aws_credentials_env(tmp.name)
        >>> changes["AWS_ACCESS_KEY_ID"] is None  # None: unset the variable
        True
        >>> os.path.getsize(changes["AWS_SHARED_CREDENTIALS_FILE"])
        0
        >>> tmp.cleanup()

        In a test, apply each change with ``monkeypatch.setenv`` /
        ``monkeypatch.delenv``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("credentials", "config"):
        (folder / name).write_text("")
    changes: dict[str, str | None] = dict.fromkeys(_AWS_CREDENTIAL_VARIABLES)
    changes["AWS_SHARED_CREDENTIALS_FILE"] = str(folder / "credentials")
    changes["AWS_CONFIG_FILE"] = str(folder / "config")
    changes["AWS_EC2_METADATA_DISABLED"] = "true"
    return changes


def no_google_credentials_env(folder: str | os.PathLike[str]) -> dict[str, str | None]:
    """Environment changes under which google-auth's default lookup finds no credentials.

    ``folder`` becomes an empty gcloud configuration folder. ``NO_GCE_CHECK``
    says "not on GCE", and the metadata server's host points at a refused
    local port as well, so no client waits for, or leaves the machine to
    find, a metadata server. Pass ``token="google_default"`` in the storage
    options: without a token gcsfs quietly falls back to anonymous access.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> changes = no_google_credentials_env(f"{tmp.name}/gcloud")
        >>> changes["NO_GCE_CHECK"], changes["GOOGLE_APPLICATION_CREDENTIALS"]
        ('true', None)
        >>> tmp.cleanup()
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nowhere = refused_endpoint().removeprefix("http://")
    changes: dict[str, str | None] = dict.fromkeys(_GOOGLE_CREDENTIAL_VARIABLES)
    changes["CLOUDSDK_CONFIG"] = str(folder)
    changes["NO_GCE_CHECK"] = "true"
    for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
        changes[name] = nowhere
    return changes


def applied_env(
    changes: Mapping[str, str | None], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``base`` (default ``os.environ``) with ``changes`` applied; ``None`` removes a variable.

    Example:
        >>> applied_env({"A": "1", "B": None}, {"B": "x", "C": "y"})
        {'C': 'y', 'A': '1'}
    """
    env = dict(os.environ if base is None else base)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env
