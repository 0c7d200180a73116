"""Small composable validators for options: params.yaml entries and model keyword arguments.

A check is a callable object with a human `description`. Calling it with a value and the option's
dotted name returns the value unchanged when it is valid and otherwise raises ConfigError with one
line that names the option, what it expects and what it got:

    integer(min=1)(64, "train.batch_size")  # -> 64
    integer(min=1)(0, "train.batch_size")   # ConfigError: train.batch_size: expected an integer >= 1, got 0

Numbers are always finite (NaN and inf are rejected) and bool is never a number, because YAML reads
`true` as a bool that Python would otherwise accept as the integer 1. Containers check their items
and name the failing one, e.g. `train.lrs[1]`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from graphtune.errors import ConfigError


class Check:
    """Base of every check: `check(value, option)` returns `value` or raises ConfigError naming `option`.

    A subclass says whether the value itself has the right type and range (`accepts`); a container
    also checks its items (`check_items`), so that the error names the failing item, not the list.
    """

    description = "a valid value"
    hint = ""  # appended to the error after "; " (see `hinted`)

    def __call__(self, value, option: str):
        if not self.accepts(value):
            hint = f"; {self.hint}" if self.hint else ""
            raise ConfigError(f"{option}: expected {self.description}, got {value!r}{hint}")
        self.check_items(value, option)
        return value

    def accepts(self, value) -> bool:
        """Whether `value` has the right type and range (a container: without looking at its items)."""
        raise NotImplementedError(f"{type(self).__name__} must define accepts()")

    def check_items(self, value, option: str) -> None:
        """Check the items of an accepted container; scalars have none."""

    def __repr__(self) -> str:
        return f"<check: {self.description}>"


def _bounds(min, max, min_open: bool, max_open: bool) -> str:
    """' >= 1', ' > 0', ' in [0, 1)' or '' for the description of a range."""
    if min is not None and max is not None:
        return f" in {'(' if min_open else '['}{min}, {max}{')' if max_open else ']'}"
    if min is not None:
        return f" {'>' if min_open else '>='} {min}"
    if max is not None:
        return f" {'<' if max_open else '<='} {max}"
    return ""


def _within(value, min, max, min_open: bool, max_open: bool) -> bool:
    if min is not None and (value <= min if min_open else value < min):
        return False
    return max is None or (value < max if max_open else value <= max)


class integer(Check):  # noqa: N801 - lower case: reads as a type in a declaration, like `field`
    """An int (not a bool) in an optional closed range, e.g. integer(min=1)."""

    def __init__(self, min: int | None = None, max: int | None = None):
        self.min, self.max = min, max
        self.description = "an integer" + _bounds(min, max, False, False)

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints are Integral too
            return False
        return _within(value, self.min, self.max, False, False)


class number(Check):  # noqa: N801
    """A finite int or float (not a bool, NaN or inf) in an optional range; each end closed unless *_open."""

    def __init__(self, min: float | None = None, max: float | None = None, *, min_open: bool = False,
                 max_open: bool = False):
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open
        self.description = "a finite number" + _bounds(min, max, min_open, max_open)

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        return _within(value, self.min, self.max, self.min_open, self.max_open)


class boolean(Check):  # noqa: N801
    """true or false (not 0/1 or the strings "yes"/"no")."""

    description = "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


class choice(Check):  # noqa: N801
    """One of a fixed set of values, e.g. choice("auto", "on", "off")."""

    def __init__(self, *values):
        if not values:
            raise ValueError("choice() needs at least one allowed value")
        self.values = values
        self.description = "one of " + ", ".join(str(v) for v in values)

    def accepts(self, value) -> bool:
        # type-exact: True must not pass as 1, nor 1 as "1"
        return any(type(value) is type(v) and value == v for v in self.values)


class text(Check):  # noqa: N801
    """A string; with nonempty=True, not "" or only whitespace."""

    def __init__(self, nonempty: bool = False):
        self.nonempty = nonempty
        self.description = "a non-empty string" if nonempty else "a string"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and (not self.nonempty or bool(value.strip()))


class mapping(Check):  # noqa: N801
    """A mapping (a YAML `{...}` block); its entries are validated by their consumer."""

    description = "a mapping"

    def accepts(self, value) -> bool:
        return isinstance(value, Mapping)


class optional(Check):  # noqa: N801
    """None (YAML null) or a value that passes `check`."""

    def __init__(self, check: Check):
        self.check = check
        self.description = f"null or {check.description}"

    def accepts(self, value) -> bool:
        return value is None or self.check.accepts(value)

    def check_items(self, value, option: str) -> None:
        if value is not None:
            self.check.check_items(value, option)


class list_of(Check):  # noqa: N801
    """A list (or tuple) of at least `min_len` items, each passing `check`; a failing item is named by index."""

    def __init__(self, check: Check, min_len: int = 1):
        self.check, self.min_len = check, min_len
        size = {0: "a list", 1: "a non-empty list"}.get(min_len, f"a list of at least {min_len} items")
        self.description = f"{size}, each item {check.description}"

    def accepts(self, value) -> bool:
        return isinstance(value, (list, tuple)) and len(value) >= self.min_len

    def check_items(self, value, option: str) -> None:
        for i, item in enumerate(value):
            self.check(item, f"{option}[{i}]")


class per_stage(list_of):  # noqa: N801
    """One value for every stage, or a non-empty list with one value per stage; each passes `check`."""

    def __init__(self, check: Check):
        super().__init__(check, min_len=1)
        self.description = f"{check.description}, or a non-empty list of them (one per stage)"

    def accepts(self, value) -> bool:
        return super().accepts(value) or (not isinstance(value, (list, tuple)) and self.check.accepts(value))

    def check_items(self, value, option: str) -> None:
        if isinstance(value, (list, tuple)):
            super().check_items(value, option)


class hinted(Check):  # noqa: N801
    """`check` with advice appended to its error, e.g. hinted(check, "use null to disable")."""

    def __init__(self, check: Check, hint: str):
        self.check, self.hint = check, hint
        self.description = check.description

    def accepts(self, value) -> bool:
        return self.check.accepts(value)

    def check_items(self, value, option: str) -> None:
        self.check.check_items(value, option)
