"""Older partialstore code from this repository's history, run in a subprocess.

Format changes are checked against the real code of the versions before
them: :func:`archive` takes the package (backends inside it) at a commit
with ``git archive``, and :func:`run_older` runs one call with it in a fresh
interpreter. The tests need a clone, as CI makes.

Example (what a test does)::

    code = archive("50adc34", tmp_path)
    assert run_older(code, "partialstore.save(sys.argv[2], {'x': 1})", path) == "ok"
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def archive(commit: str, root: Path) -> Path:
    """The package as of ``commit`` under ``root``, backends inside it, ready for PYTHONPATH."""
    tar_path = root / f"{commit}.tar"
    subprocess.run(
        ["git", "archive", "-o", str(tar_path), commit, "partialstore", "backends"],
        cwd=REPO_ROOT,
        check=True,
        timeout=60,
    )
    with tarfile.open(tar_path) as tar:
        tar.extractall(root, filter="data")
    (root / "backends").rename(root / "partialstore" / "backends")
    return root


def run_older(code: Path, call: str, path: str) -> str:
    """Run ``call`` with the code under ``code`` in a fresh interpreter: "ok" or the error.

    ``call`` sees ``sys.argv[2]`` as ``path``, and numpy as ``np``.
    """
    script = (
        "import sys, numpy as np, partialstore\n"
        "assert partialstore.__file__.startswith(sys.argv[1]), partialstore.__file__\n"
        "try:\n"
        f"    {call}\n"
        "    print('ok')\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(code), path],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=code,  # not the repository, whose partialstore would come first on sys.path
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]
