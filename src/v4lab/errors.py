"""The one error type for bad configuration, and the checks that raise it.

Bottom layer: imports nothing from v4lab. Every message names the full key
(``path.field``), the bad value and what is allowed, so a wrong config fails before any
training starts.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid. The message names key, value and what is allowed."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` for ``key=value`` unless ``ok``; ``allowed`` says what is."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, key, value, f"one of {', '.join(map(repr, choices))}")


def require_positive(key: str, value: Any) -> None:
    require(isinstance(value, int) and value > 0, key, value, "a positive integer")
