"""Bad-input errors: reported as one line with exit code 2, never as a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Input the user can fix: an unknown name, a value out of range, a missing file."""


class ConfigError(UserError, ValueError):
    """A configuration value outside what is allowed."""


def one_line(exc: BaseException) -> str:
    """"Type: first line of the message": how a failure shows in results.json, W&B and sweep reports."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
