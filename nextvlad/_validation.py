"""Argument checks shared across the package: errors name the argument and the bad value."""

from __future__ import annotations


def check_positive(**values: int | float) -> None:
    """Raise ValueError naming the first argument that is not >= 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_positive_int(**values: int) -> None:
    """Raise ValueError naming the first argument that is not an integer >= 1 (a bool is not one)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise ValueError unless value is one of choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
