from decimal import Decimal
from fractions import Fraction

import pytest

from lightning_parablock.eval import answers_match, extract_numeric_answer, extract_reference_answer

GSM8K_REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)

MODEL_OUTPUTS = [
    # GSM8K-style chain of thought with calculator annotations and the #### marker
    (GSM8K_REFERENCE, Fraction(72)),
    ("Janet eats 3 and bakes 4, so 16-3-4=<<16-3-4=9>>9 eggs are left.\n9*2=<<9*2=18>>18\n#### 18", Fraction(18)),
    ("#### $1,234.50", Fraction("1234.5")),
    ("####42", Fraction(42)),
    # answer phrases
    ("First, 5 + 7 = 12. Then 12 * 2 = 24. The answer is 24.", Fraction(24)),
    ("The answer is: **$18.00**", Fraction(18)),
    ("The answer is:\n\n-7 degrees", Fraction(-7)),
    ("**Final Answer:** 1,000 people", Fraction(1000)),
    ("Answer = 12 dollars", Fraction(12)),
    ("The answer is below.\nStep 1: 3 + 4 = 7\nThe answer is 9.", Fraction(9)),
    # a base model that goes on to invent (and answer) a new question: the first marked answer counts
    ("The answer is 5.\n\nQuestion: Tom has 3 cats and gets 2 more. How many?\nThe answer is 5 + 2 = 7.", Fraction(5)),
    ("A: 42", Fraction(42)),
    ("Q: How many?\nA: $-5.50", Fraction("-5.5")),
    ("A: Let's think step by step. 3 + 4 = 7, and 7 * 2 = 14. So 14 apples.", Fraction(14)),
    # MATH-style LaTeX
    ("So the total is $\\boxed{1{,}234}$.", Fraction(1234)),
    ("The answer is $\\boxed{\\frac{3}{4}}$", Fraction(3, 4)),
    ("\\boxed{\\$42} \\text{ dollars}", Fraction(42)),
    # plain numbers, units, signs and fractions: the last number counts
    ("42 apples", Fraction(42)),
    ("The discount is 15%", Fraction(15)),
    ("It takes 3 hours", Fraction(3)),
    ("It is -7 degrees outside", Fraction(-7)),
    ("She pays -$5", Fraction(-5)),
    ("$1,234.50", Fraction("1234.5")),
    ("Total: 12 - 5", Fraction(5)),  # a subtraction, not the number -5
    ("He ate 3/4 of the pie", Fraction(3, 4)),
    ("48/2 = 24 clips", Fraction(24)),
    ("Half is 0.5 and a tenth is .1", Fraction(1, 10)),
    ("Between 5–10 minutes", Fraction(10)),
    # nothing to read
    ("I don't know.", None),
    ("forty-two", None),
    ("", None),
    ("x2 + y3", None),
    ("1/0", None),
]


@pytest.mark.parametrize(("text", "expected"), MODEL_OUTPUTS)
def test_extract_numeric_answer(text, expected):
    assert extract_numeric_answer(text) == expected


def test_annotation_operands_are_never_the_answer():
    # Without the #### line the last number outside the annotation is the answer, not the annotation's 12.
    assert extract_numeric_answer("3*4=<<3*4=12>>12 apples, plus 5 pears") == 5
    assert extract_numeric_answer("<<3*4=12>>") is None


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (GSM8K_REFERENCE, Fraction(72)),
        ("#### -5", Fraction(-5)),
        ("#### 1,000", Fraction(1000)),
        ("42", Fraction(42)),
        (" 1,234.5 ", Fraction("1234.5")),
        ("3/4", Fraction(3, 4)),
        ("$5.", Fraction(5)),
        (42, Fraction(42)),
        (0.1, Fraction(1, 10)),
        (Decimal("2.50"), Fraction(5, 2)),
        (Fraction(1, 3), Fraction(1, 3)),
    ],
)
def test_extract_reference_answer(reference, expected):
    assert extract_reference_answer(reference) == expected


@pytest.mark.parametrize("reference", ["forty-two", "42 apples", "", "#### ", "odd"])
def test_unreadable_reference_is_an_error_naming_it(reference):
    with pytest.raises(ValueError, match=f"from {reference!r}.*expected GSM8K's"):
        extract_reference_answer(reference)


@pytest.mark.parametrize("reference", [True, None, [42], float("nan"), Decimal("Infinity")])
def test_non_numeric_reference_types_are_refused(reference):
    with pytest.raises((TypeError, ValueError), match="reference"):
        extract_reference_answer(reference)


@pytest.mark.parametrize(
    ("prediction", "reference", "match"),
    [
        ("The answer is 42.", "#### 42", True),
        (42, "42.00", True),
        (42.0, 42, True),
        ("42.00", 42, True),
        (Decimal("42.0"), "#### 42", True),
        ("0.75", "3/4", True),
        (0.1, "0.1", True),
        ("The answer is 41.", "#### 42", False),
        ("#### 42.5", 42, False),
        ("no idea", 42, False),
        (None, 42, False),
    ],
)
def test_answers_match(prediction, reference, match):
    assert answers_match(prediction, reference) is match


def test_answers_match_refuses_a_bool_prediction():
    with pytest.raises(TypeError, match="`prediction` must be a str or a number.*got True"):
        answers_match(True, 1)


def test_extract_numeric_answer_wants_text():
    with pytest.raises(TypeError, match="got int: 42"):
        extract_numeric_answer(42)
