"""Bad-input errors: reported as one line with exit code 2, never as a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Input the user can fix: an unknown name, a value out of range, a missing file."""


class ConfigError(UserError, ValueError):
    """A configuration value outside what is allowed."""
