"""The tokenizer's chat template, applied so that a template's failure is a refusal naming the row, not a traceback.

A chat template is code the checkpoint ships (Jinja): it may raise on a conversation it does not accept (a system
turn, turns that do not alternate), and transformers adds its own refusals. Either ends here as a
:class:`ChatTemplateError` with the template's complaint on one line; the data module adds the file and the row.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from lightning_parablock.argument_checks import one_line


class ChatTemplateError(ValueError):
    """The chat template cannot render a conversation the way training needs; ``row`` is the row it came from, once
    known (the arguments are kept as ``args`` so that the error crosses ``datasets.map``'s worker processes)."""

    def __init__(self, problem: str, row: Optional[int] = None) -> None:
        super().__init__(problem, row)
        self.problem, self.row = problem, row

    def __str__(self) -> str:
        return self.problem if self.row is None else f"row {self.row}: {self.problem}"


def apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **options: Any) -> Any:
    """``tokenizer.apply_chat_template(messages, **options)``; whatever the template raises becomes a
    :class:`ChatTemplateError` quoting it."""
    try:
        return tokenizer.apply_chat_template(messages, **options)
    except Exception as error:  # noqa: BLE001 - the template is the checkpoint's code: any failure is its refusal
        raise ChatTemplateError(
            f"the tokenizer's chat template refused the conversation ({type(error).__name__}: {one_line(error)});"
            " drop or fix such rows (a template may accept no system turn, or need user and assistant turns to"
            " alternate), or set a template that accepts them (`tokenizer.chat_template`)."
        ) from None


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **options: Any) -> str:
    """The conversation as text (:func:`apply_template` with ``tokenize=False``)."""
    return apply_template(tokenizer, messages, tokenize=False, **options)


def check_extends(shorter: str, longer: str, what: str) -> None:
    """``longer`` starts with ``shorter``: a template whose rendering of a conversation's start changes once the
    conversation goes on (one that drops earlier ``<think>`` blocks does) leaves no place where a turn begins.
    Refused naming ``what`` and the character where the two part, without the rendered text."""
    if longer.startswith(shorter):
        return
    parted = len(os.path.commonprefix([shorter, longer]))
    raise ChatTemplateError(
        f"the chat template renders {what} differently once the conversation goes on (the two renderings part at"
        f" character {parted}), so where a turn starts cannot be found; use a template that renders every prefix"
        " of a conversation as the start of the whole (or, for chat data, marks assistant turns with"
        " {% generation %}), or a plain-text `prompt_format` for instruction data."
    )
