"""Argument checks shared across the package: errors name the argument and the bad value."""

from __future__ import annotations

from numbers import Integral
from pathlib import Path


def is_integer(value: object) -> bool:
    """An int or a NumPy integer (numbers.Integral), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_positive_int(**values: int) -> None:
    """Raise ValueError naming the first argument that is not an integer >= 1 (a bool is not one)."""
    for name, value in values.items():
        if not is_integer(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_in_range(name: str, value: float, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    """Raise ValueError naming the argument unless ``low <= value <= high`` (``low < value`` with
    ``low_open``); a NaN is never in range."""
    above = value > low if low_open else value >= low
    if not (above and value <= high):
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high != float('inf') else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise ValueError unless value is one of choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def output_overwrites_input(output: str, inputs: dict[str, str | None]) -> str | None:
    """The first of ``inputs`` (option -> path) that is the same file as ``output``, or None: a
    command must not write its result over what it reads (paths compared resolved)."""
    target = Path(output).resolve()
    return next((option for option, path in inputs.items() if path is not None and Path(path).resolve() == target),
                None)
