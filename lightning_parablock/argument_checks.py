"""Checks for constructor arguments: a bad value is refused at construction, naming it and what is accepted.

Each checker returns the value (a count as ``int``, a rate or a duration as ``float``) or raises ``ValueError``
(``TypeError`` for a value of the wrong kind) whose message names the argument, the value given and the accepted
range. ``bool`` is never taken for a number, and a float is never silently truncated to a count: ``2.5`` clients
is an error, ``2.0`` is accepted as 2 (YAML and JSON do not always keep the difference).
"""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Any, Optional

_QUOTED_TEXT_LIMIT = 300


def one_line(error: BaseException) -> str:
    """Another library's error text on one line and cut short, to quote inside a message of this package's own."""
    text = re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__
    return text if len(text) <= _QUOTED_TEXT_LIMIT else text[: _QUOTED_TEXT_LIMIT - 3] + "..."


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _bound_text(minimum: Optional[float], maximum: Optional[float], min_open: bool, max_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if minimum is not None:
        return f"{'>' if min_open else '>='} {minimum:g}"
    return f"{'<' if max_open else '<='} {maximum:g}"


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``; a float with a fraction, a bool or a string is refused."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{name}` must be an integer, got {_describe(value)}.")
    if not isinstance(value, Integral):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"`{name}` must be an integer, got {_describe(value)}.")
    count = int(value)
    if (minimum is not None and count < minimum) or (maximum is not None and count > maximum):
        accepted = "a positive integer" if (minimum, maximum) == (1, None) else (
            f"an integer {_bound_text(minimum, maximum, False, False)}"
        )
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return count


def check_optional_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> Optional[int]:
    """:func:`check_int`, with ``None`` passed through."""
    return None if value is None else check_int(name, value, minimum, maximum)


def check_float(
    name: str,
    value: Any,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` within the bounds (``min_open``/``max_open`` exclude the bound itself)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{name}` must be a number, got {_describe(value)}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    too_low = minimum is not None and (number <= minimum if min_open else number < minimum)
    too_high = maximum is not None and (number >= maximum if max_open else number > maximum)
    if too_low or too_high:
        raise ValueError(f"`{name}` must be {_bound_text(minimum, maximum, min_open, max_open)}, got {value!r}.")
    return number


def check_positive(name: str, value: Any) -> float:
    """A finite number ``> 0``; zero says "must be positive"."""
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value <= 0:
        raise ValueError(f"`{name}` must be positive, got {value!r}.")
    return check_float(name, value, minimum=0.0, min_open=True)


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        *others, last = (repr(choice) for choice in choices)
        accepted = f"{', '.join(others)} or {last}" if others else last
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``: a string such as ``"no"`` would otherwise read as true."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {_describe(value)}.")
    return value


def check_optional_text(name: str, value: Any, accepted: str = "a non-empty string") -> Any:
    """``value``, unless it is the empty string: ``None`` means unset, and ``""`` is neither unset nor a name."""
    if isinstance(value, str) and not value:
        raise ValueError(f"`{name}` must be {accepted}, or None to leave it unset, got {value!r}.")
    return value

