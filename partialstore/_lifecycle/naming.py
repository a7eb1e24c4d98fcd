"""Step names under a run's root: ``step_format`` checked once, and parsed back.

Example:
    >>> namer = StepNamer("step_{step:08d}")
    >>> namer.name(42)
    'step_00000042'
    >>> namer.parse("step_00000042"), namer.parse("step_42"), namer.parse("notes.txt")
    (42, None, None)
"""

from __future__ import annotations

import os
import re
import string

from partialstore._commit.location import STAGING_SUFFIX
from partialstore.errors import InvalidInputError
from partialstore.registry import scheme_of

__all__ = ["StepNamer", "check_step", "normalize_root"]


def check_step(step: object) -> int:
    """Return ``step`` if it is a non-negative int (not a bool), else raise.

    Example:
        >>> check_step(3)
        3
        >>> check_step(-1)
        Traceback (most recent call last):
        partialstore.errors.InvalidInputError: A step must be a non-negative int, got -1.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidInputError(f"A step must be a non-negative int, got {step!r}.")
    return step


def normalize_root(root: object) -> str:
    """A run's root as one spelling: a local path made absolute, a URL without trailing ``/``.

    Example:
        >>> normalize_root("s3://bucket/run/")
        's3://bucket/run'
    """
    if not isinstance(root, str | os.PathLike):
        raise InvalidInputError(
            f"CheckpointManager root must be a str or os.PathLike, got {type(root).__name__}."
        )
    text = os.fspath(root)
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("CheckpointManager root must be a non-empty path or URL.")
    if scheme_of(text) == "":
        return os.path.abspath(os.path.expanduser(text))
    return text.rstrip("/")


class StepNamer:
    """Turns steps into checkpoint names with ``step_format`` and names back into steps.

    A name parses back only when formatting its number gives exactly that
    name, so ``step_42`` is not step 42 under ``step_{step:08d}``.
    """

    def __init__(self, step_format: str) -> None:
        if not isinstance(step_format, str):
            raise InvalidInputError(
                f"step_format must be a str such as 'step_{{step:08d}}', got "
                f"{type(step_format).__name__}."
            )
        self.step_format = step_format
        self._pattern = re.compile(self._regex(step_format))
        for probe in (0, 7, 123456789):
            name = self._format(probe)
            if "/" in name or name in (".", "..") or name.endswith(STAGING_SUFFIX):
                raise InvalidInputError(
                    f"step_format {step_format!r} gives {name!r} for step {probe}: a step's "
                    f"name must be one path segment, not ending in {STAGING_SUFFIX!r}."
                )
            if self.parse(name) != probe:
                raise InvalidInputError(
                    f"step_format {step_format!r} gives {name!r} for step {probe}, which does "
                    "not read back as that step: write the step as a decimal number, e.g. "
                    "'step_{step:08d}' or 'ckpt-{step}'."
                )

    @staticmethod
    def _regex(step_format: str) -> str:
        try:
            parts = list(string.Formatter().parse(step_format))
        except ValueError as error:
            raise InvalidInputError(f"step_format {step_format!r} is malformed: {error}.") from None
        fields = [field for _, field, _, _ in parts if field is not None]
        if fields != ["step"]:
            raise InvalidInputError(
                f"step_format {step_format!r} must hold exactly one field, {{step}} "
                f"(e.g. 'step_{{step:08d}}'); it holds {fields or 'none'}."
            )
        pattern = ""
        for literal, field, _, _ in parts:
            pattern += re.escape(literal)
            if field is not None:
                pattern += r"(\d+)"
        return f"^{pattern}$"

    def _format(self, step: int) -> str:
        try:
            return self.step_format.format(step=step)
        except (ValueError, TypeError, IndexError, KeyError) as error:
            raise InvalidInputError(
                f"step_format {self.step_format!r} cannot format a step: {error}."
            ) from None

    def name(self, step: int) -> str:
        """The checkpoint name of ``step`` (a non-negative int)."""
        return self._format(check_step(step))

    def parse(self, name: str) -> int | None:
        """The step ``name`` stands for, or ``None`` when it is no step's name."""
        match = self._pattern.match(name)
        if match is None:
            return None
        step = int(match.group(1))
        return step if self._format(step) == name else None
