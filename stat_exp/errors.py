"""Bad-input errors: reported as one line with exit code 2, never as a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Input the user can fix: an unknown name, a value out of range, a missing file."""


class ConfigError(UserError, ValueError):
    """A configuration value outside what is allowed."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an error's message (its type's name when it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """"Type: first line of the message": how a failure shows in results.json, W&B and sweep reports
    ("interrupted" for Ctrl-C)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {first_line(exc)}" if text else type(exc).__name__
