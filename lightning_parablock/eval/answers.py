"""The final number of a math answer, read from free-form model output or from a GSM8K reference.

Values are :class:`fractions.Fraction` so that comparison is exact: ``42 == 42.0 == "42.00"`` and
``"0.75" == "3/4"`` hold without a float tolerance, and a ``1/3`` stays a third.

Model outputs are read by these rules in order of trust; the first rule that finds a number wins:

1. ``#### N``, GSM8K's own answer marker (a model fine-tuned on GSM8K emits it);
2. ``\\boxed{N}``, the LaTeX convention of MATH-style data such as MathInstruct;
3. ``The answer is N`` anywhere, or an ``Answer: N`` label at the start of a line;
4. ``A: N`` at the start of a line, with the number right after the colon;
5. otherwise the last number in the text, where chain-of-thought ends.

Rules 1-4 take the *first* mark followed by a number: a model that keeps generating past its answer tends
to invent a new question and answer that too. Numbers may carry a sign, a currency symbol, thousands
commas, decimals, an ``a/b`` fraction and trailing units (``15%``, ``3 hours``). GSM8K's calculator
annotations (``<<3*4=12>>``) are removed before reading, so their operands are never mistaken for the answer.
"""

import math
import re
from decimal import Decimal
from fractions import Fraction
from numbers import Rational, Real
from typing import Optional, Union

Number = Union[int, float, Decimal, Fraction]
"""A numeric answer as callers may hold it; every one converts exactly to a ``Fraction``."""

_NUMBER = re.compile(
    r"(?<![\w.])"  # not the tail of a word, identifier or decimal
    r"(?P<sign>[-−]?)(?:[$€£]\s*)?(?P<sign2>[-−]?)"  # "-5", "-$5", "$-5", "$ 5"; never "5 - 3" as -3
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<frac>\.\d+)?"
    r"(?:/(?P<den>\d+))?"
    r"(?!\d)"
)
_ANNOTATION = re.compile(r"<<[^<>]*>>")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_GSM8K_MARK = re.compile(r"####")
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_PHRASE = re.compile(
    r"\banswer\s+(?:is|was|would\s+be|will\s+be)\b\s*:?"  # "... the answer is 42"
    r"|^[\s*#_>]*(?:the\s+)?(?:final\s+)?answer[\s*_]*[:=]",  # "Answer: 42", "**Final Answer:** 42"
    re.IGNORECASE | re.MULTILINE,
)
_A_LABEL = re.compile(r"^[\s*]*A\s*:[\s*]*", re.MULTILINE)


def _normalize(text: str) -> str:
    """Drop calculator annotations and the LaTeX that hides plain numbers (``\\frac``, ``\\$``, ``{,}``)."""
    text = _ANNOTATION.sub("", text)
    text = _LATEX_FRACTION.sub(r"\1/\2", text)
    return text.replace("\\$", "$").replace("{,}", ",").replace("\\,", "").replace("\\!", "")


def _parse(match: "re.Match[str]") -> Optional[Fraction]:
    integer, fraction, denominator = match["int"], match["frac"], match["den"]
    if integer is None and fraction is None:
        return None
    value = Fraction((integer or "0").replace(",", "") + (fraction or ""))
    if denominator is not None:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    return -value if match["sign"] or match["sign2"] else value


def _numbers(text: str) -> list[Fraction]:
    return [value for match in _NUMBER.finditer(text) if (value := _parse(match)) is not None]


def _first_number(text: str) -> Optional[Fraction]:
    numbers = _numbers(text)
    return numbers[0] if numbers else None


def _boxed_content(text: str, start: int) -> str:
    """The text inside the braces opened just before ``start``, balancing nested braces."""
    depth = 1
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return text[start:]


def _first_line(text: str) -> str:
    """The first non-blank line of ``text``: where an answer follows ``The answer is`` or ``Answer:``."""
    return text.lstrip().split("\n", 1)[0]


def _after_mark(text: str, mark: "re.Match[str]") -> Optional[Fraction]:
    return _first_number(_first_line(text[mark.end() :]))


def _inside_box(text: str, mark: "re.Match[str]") -> Optional[Fraction]:
    return _first_number(_boxed_content(text, mark.end()))


def _right_after(text: str, mark: "re.Match[str]") -> Optional[Fraction]:
    match = _NUMBER.match(text, mark.end())
    return _parse(match) if match else None


_RULES = (
    (_GSM8K_MARK, _after_mark),
    (_BOXED, _inside_box),
    (_ANSWER_PHRASE, _after_mark),
    (_A_LABEL, _right_after),
)
"""The marked-answer rules of the module docstring (1-4), each a pattern and how to read the number it marks."""


def extract_numeric_answer(text: str) -> Optional[Fraction]:
    """The number a model's output gives as its answer, or ``None`` when it contains no number.

    See the module docstring for the rules; within a rule the first mark that is followed by a number wins.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a model's output as a str, got {type(text).__name__}: {text!r}.")
    text = _normalize(text)
    for pattern, read in _RULES:
        for mark in pattern.finditer(text):
            value = read(text, mark)
            if value is not None:
                return value
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _as_fraction(value: Number, name: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (Real, Decimal)):
        raise TypeError(f"`{name}` must be a str or a number (int, float, Decimal, Fraction), got {value!r}.")
    if isinstance(value, Rational):
        return Fraction(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        return Fraction(value)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    # repr is the shortest decimal that round-trips, so 0.1 becomes 1/10 rather than its binary neighbour.
    return Fraction(repr(value))


def extract_reference_answer(reference: Union[str, Number]) -> Fraction:
    """The gold answer of a dataset row: GSM8K's ``"...#### 72"``, a numeric string such as ``"1,234.5"``, or a number.

    Unlike :func:`extract_numeric_answer` this is strict, because a reference that cannot be read would
    silently count every prediction as wrong.

    Raises:
        ValueError: if ``reference`` is a string with no ``#### N`` marker that is not a single number.
    """
    if not isinstance(reference, str):
        return _as_fraction(reference, "reference")
    text = _normalize(reference)
    mark = text.rfind("####")
    candidate = text[mark + len("####") :] if mark >= 0 else text
    candidate = candidate.strip().rstrip(".")
    match = _NUMBER.fullmatch(candidate)
    value = _parse(match) if match else None
    if value is None:
        raise ValueError(
            f"Cannot read a numeric reference answer from {reference!r}; expected GSM8K's '... #### N',"
            " a single number such as '42', '-3.5', '1,234' or '3/4', or an int/float/Decimal/Fraction."
        )
    return value


def answers_match(prediction: Union[str, Number, None], reference: Union[str, Number]) -> bool:
    """Whether a prediction (a model's text, a number, or ``None``) equals the reference exactly as numbers.

    Text predictions go through :func:`extract_numeric_answer`, references through
    :func:`extract_reference_answer`; a prediction without a number never matches.
    """
    expected = extract_reference_answer(reference)
    if prediction is None:
        return False
    if isinstance(prediction, str):
        value = extract_numeric_answer(prediction)
        return value is not None and value == expected
    return _as_fraction(prediction, "prediction") == expected
