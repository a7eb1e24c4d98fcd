"""How TensorStore reaches an S3 backend's store: endpoint, region, and s3fs's identity.

TensorStore's ``s3`` driver cannot take an access key in its spec; it takes
a credentials *provider*. Left to its default chain it probes
``~/.aws/config`` and ``~/.aws/credentials`` and logs five ``E...`` lines
through absl for every store it opens when they are missing, even when the
keys are in the environment. So the backend always names the provider that
matches where botocore (s3fs) found its credentials:

=====================================  =========================================
s3fs / botocore                        TensorStore ``aws_credentials``
=====================================  =========================================
``anon=True``                          ``{"type": "anonymous"}``
``AWS_ACCESS_KEY_ID`` / ``..._SECRET``  ``{"type": "environment"}``
explicit ``key``/``secret`` options    the same as the environment's:
                                       ``environment``; else ``profile`` read
                                       from an anonymous memory file (below)
a profile in the shared files          ``profile`` with that name and both file
                                       paths (a missing one: ``/dev/null``)
EC2 instance role                      ``{"type": "imds"}``
ECS / EKS container role               ``{"type": "ecs"}``
anything else (SSO, assume-role...)    ``default`` with the profile name
=====================================  =========================================

Explicit keys that differ from the environment are written to a Linux
``memfd`` (:class:`SecretFile`): an anonymous file in memory, mode 0600,
reached as ``/proc/self/fd/N``. It never touches a disk, and the kernel frees
it when the process exits however it exits (SIGKILL included), so no
cleanup can be missed. Where ``memfd_create`` does not exist, TensorStore is
not given the keys at all (:func:`static_credentials` returns ``None``): the
backend then moves array bytes through s3fs instead.

Example:
    >>> secrets = []
    >>> static_credentials({"key": "k", "secret": "s"}, {}, secrets)["type"]  # via a SecretFile
    'profile'
    >>> secrets[0].close()
    >>> static_credentials({}, {}, []) is RESOLVE  # then ask botocore (resolve_credentials)
    True
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "RESOLVE",
    "SecretFile",
    "endpoint_of",
    "region_of",
    "resolve_credentials",
    "static_credentials",
]

#: :func:`static_credentials`'s answer when only botocore knows where the keys are.
RESOLVE: Final = "resolve"


class SecretFile:
    """Text in an anonymous in-memory file (``memfd``), readable by path in this process.

    Example:
        >>> secret = SecretFile("[p]\\naws_access_key_id = k\\n")
        >>> open(secret.path).read()
        '[p]\\naws_access_key_id = k\\n'
        >>> secret.close()
    """

    def __init__(self, text: str) -> None:
        fd = os.memfd_create("partialstore-aws-credentials", os.MFD_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(text.encode())
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.path = f"/proc/self/fd/{fd}"
        self._closer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        """Free the file (idempotent)."""
        self._closer()


def endpoint_of(options: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """The endpoint s3fs talks to (options, then ``AWS_ENDPOINT_URL_S3`` / ``..._URL``).

    Example:
        >>> endpoint_of({"endpoint_url": "http://127.0.0.1:9000"}, {})
        'http://127.0.0.1:9000'
    """
    client_kwargs = options.get("client_kwargs") or {}
    return (
        options.get("endpoint_url")
        or client_kwargs.get("endpoint_url")
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
    )


def region_of(options: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """The region s3fs signs for (options, then ``AWS_REGION`` / ``AWS_DEFAULT_REGION``).

    Example:
        >>> region_of({"client_kwargs": {"region_name": "eu-west-1"}}, {})
        'eu-west-1'
    """
    client_kwargs = options.get("client_kwargs") or {}
    config_kwargs = options.get("config_kwargs") or {}
    return (
        client_kwargs.get("region_name")
        or config_kwargs.get("region_name")
        or options.get("region_name")
        or env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
    )


def _memfd_works() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _explicit(options: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    key = options.get("key") or options.get("username")
    secret = options.get("secret") or options.get("password")
    if not (key and secret):
        return None
    token = options.get("token")
    return str(key), str(secret), str(token) if token else None


def static_credentials(
    options: Mapping[str, Any], env: Mapping[str, str], secrets: list[SecretFile]
) -> dict[str, Any] | str | None:
    """TensorStore credentials decided by the options alone, :data:`RESOLVE`, or None.

    None means TensorStore cannot be given these credentials. A
    :class:`SecretFile` made for explicit keys is appended to ``secrets`` (the
    backend closes it).

    Example:
        >>> static_credentials({"anon": True}, {}, [])
        {'type': 'anonymous'}
    """
    if options.get("anon"):
        return {"type": "anonymous"}
    explicit = _explicit(options)
    if explicit is None:
        return RESOLVE
    key, secret, token = explicit
    if (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")) == (key, secret) and (
        env.get("AWS_SESSION_TOKEN") or None
    ) == token:
        return {"type": "environment"}
    if not _memfd_works():
        return None
    lines = ["[partialstore]", f"aws_access_key_id = {key}", f"aws_secret_access_key = {secret}"]
    if token:
        lines.append(f"aws_session_token = {token}")
    secret_file = SecretFile("\n".join(lines) + "\n")
    secrets.append(secret_file)
    return {
        "type": "profile",
        "profile": "partialstore",
        "credentials_file": secret_file.path,
        "config_file": os.devnull,
    }


def _shared_file(env: Mapping[str, str], variable: str, name: str) -> str:
    path = os.path.expanduser(env.get(variable) or os.path.join("~", ".aws", name))
    # An absent file would make TensorStore log an error on every open.
    return path if os.path.isfile(path) else os.devnull


def from_method(method: str, profile: str, env: Mapping[str, str]) -> dict[str, Any]:
    """TensorStore credentials for botocore's credential ``method`` (see the table above).

    Example:
        >>> from_method("env", "default", os.environ)
        {'type': 'environment'}
    """
    if method == "env":
        return {"type": "environment"}
    if method in ("shared-credentials-file", "config-file"):
        return {
            "type": "profile",
            "profile": profile,
            "credentials_file": _shared_file(env, "AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            "config_file": _shared_file(env, "AWS_CONFIG_FILE", "config"),
        }
    if method == "iam-role":
        return {"type": "imds"}
    if method == "container-role":
        return {"type": "ecs"}
    return {"type": "default", "profile": profile}


async def resolve_credentials(fs: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Ask s3fs's botocore session where its credentials come from (on ``fs.loop``).

    Raises:
      botocore.exceptions.NoCredentialsError: botocore found none.

    It asks botocore's credential chain through ``fs``, so it has no offline
    example; the backend calls it as
    ``await on_loop(fs.loop, lambda: resolve_credentials(fs, options))``.
    """
    from botocore.exceptions import NoCredentialsError

    await fs.set_session()
    credentials = await fs.session.get_credentials()
    if credentials is None:
        raise NoCredentialsError()
    profile = str(options.get("profile") or os.environ.get("AWS_PROFILE") or "default")
    return from_method(str(getattr(credentials, "method", "")), profile, os.environ)
