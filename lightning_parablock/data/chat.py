"""Multi-turn chat data: conversations checked into one shape, rendered with the tokenizer's chat template, and
the loss on every assistant turn that answers a user and on nothing else.

Two layouts are read: a ``messages`` column of ``{role, content}`` turns (OpenAI / TRL), and ShareGPT's
``conversations`` of ``{from, value}`` turns (``human``/``gpt``/``system``). Both become ``messages``. Whenever the
data has such a column it is what is trained, and every row is checked the same way, whatever columns stand beside
it.

Which tokens an assistant wrote comes from the template: where it marks generation (``{% generation %}``),
transformers' ``return_assistant_tokens_mask``; otherwise each assistant turn's characters are found by rendering
the conversation up to that turn with and without it. Either way a token overlapping an assistant turn's characters
is kept (offsets of a fast tokenizer), so the loss also covers the end-of-turn markers the template writes after
the answer, and both ways give the same labels. An assistant turn before the first user turn (a greeting) is
context: in the input, never in the loss, since the model is only ever asked to answer.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_parablock.data.chat_template import apply_template, check_extends, render
from lightning_parablock.data.formatting import IGNORE_INDEX

MESSAGES, CONVERSATIONS = "messages", "conversations"
CHAT_COLUMNS = (MESSAGES, CONVERSATIONS)
INSTRUCTION_FIELDS = ("instruction", "input", "output")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_QUOTED_VALUE_LIMIT = 60


def chat_column(named: Optional[dict[str, str]], available: list[str], where: str) -> Optional[str]:
    """The data's conversation column, which is then what is trained: the one ``named`` (the user's ``columns``)
    gives as ``{messages: ...}``, else ``messages`` or ``conversations`` when the data has one, beside instruction
    columns too (``instruction`` and ``output`` are then read from the conversation); ``None`` for instruction data.

    ``columns`` that map instruction fields over data with a conversation column are refused: they would be ignored.
    """
    named = named or {}
    if named.get(MESSAGES) is not None:
        return named[MESSAGES]
    found = next((column for column in CHAT_COLUMNS if column in available), None)
    mapped = sorted(set(named) & set(INSTRUCTION_FIELDS))
    if found is not None and mapped:
        raise ValueError(
            f"{where} has the conversation column {found!r}, which is what is trained, but `columns` maps {mapped} as"
            f" for instruction data: leave those out (the instruction is read from the first user turn) and name the"
            f" conversations with `columns: {{messages: {found}}}`, or remove the column {found!r} from the data to"
            " train the instruction columns."
        )
    return found


def to_chat_schema(dataset: Dataset, column: str, where: str) -> Dataset:
    """A ``messages`` column of ``{role, content}`` turns from ``column``, plus ``instruction`` (the first user
    turn), an empty ``input`` and ``output`` (the last assistant turn), so evaluation and partitioning read chat
    data as they read instruction data. Other columns are kept, to split clients by; instruction columns beside the
    conversation are replaced.
    """
    if column not in dataset.column_names:
        raise ValueError(
            f"{where} has no column {column!r} of conversations; its columns are {dataset.column_names}. Name it"
            " with `columns: {messages: ...}`."
        )
    replaced = [c for c in dict.fromkeys((column, *INSTRUCTION_FIELDS)) if c in dataset.column_names]
    return dataset.map(
        _chat_row, with_indices=True, fn_kwargs={"column": column, "where": where}, remove_columns=replaced,
        desc="Reading conversations",
    )  # fmt: skip


def _chat_row(example: dict[str, Any], row: int, column: str, where: str) -> dict[str, Any]:
    turns = check_conversation(example[column], f"{where}, row {row}")
    return {
        MESSAGES: turns,
        "instruction": next(t["content"] for t in turns if t["role"] == "user"),
        "input": "",
        "output": [t["content"] for t in turns if t["role"] == "assistant"][-1],
    }


def check_conversation(turns: Any, where: str) -> list[dict[str, str]]:
    """``turns`` as ``{role, content}`` dicts, refused naming ``where`` (the file and the row) when it is not a
    non-empty list of dicts with a known role and text content, or has no assistant turn answering a user turn."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: a conversation must be a non-empty list of turns, got {_quoted(turns)}.")
    checked = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}, turn {index}: a turn must be a dict of role and content, got {_quoted(turn)}.")
        sharegpt = "from" in turn and turn.get("role") is None
        role = SHAREGPT_ROLES.get(turn.get("from")) if sharegpt else turn.get("role")
        content = turn.get("value") if sharegpt else turn.get("content")
        if not isinstance(role, str) or role not in ROLES:
            given = turn.get("from") if sharegpt else turn.get("role")
            accepted = sorted(SHAREGPT_ROLES) if sharegpt else list(ROLES)
            raise ValueError(f"{where}, turn {index}: unknown role {_quoted(given)}; use one of {accepted}.")
        if not isinstance(content, str):
            parts = " (join a list of content parts into one string)" if isinstance(content, list) else ""
            raise ValueError(
                f"{where}, turn {index}: the {role} turn's content must be text, got {type(content).__name__}"
                f" {_quoted(content)}{parts}."
            )
        checked.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in checked[_first_user(checked) + 1 :]):
        raise ValueError(
            f"{where}: a conversation needs an assistant turn answering a user turn to train on (an assistant turn"
            " before the first user turn is context); drop the row or add the turns."
        )
    return checked


def _quoted(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTED_VALUE_LIMIT else text[: _QUOTED_VALUE_LIMIT - 3] + "..."


def _first_user(messages: list[dict[str, str]]) -> int:
    """The index of the first user turn (the number of turns when there is none)."""
    return next((index for index, message in enumerate(messages) if message["role"] == "user"), len(messages))


def check_chat_template(tokenizer: PreTrainedTokenizerBase, remedy: str) -> None:
    """Refuse a tokenizer without a chat template, saying what to give instead (``remedy``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer {tokenizer.name_or_path!r} has no chat template to render conversations with; {remedy}"
        )


def encode_conversation(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` of the rendered conversation, uncut; labels are ``-100``
    except on the tokens of assistant turns that answer a user. A template that cannot render the conversation
    raises :class:`~lightning_parablock.data.chat_template.ChatTemplateError`."""
    check_chat_template(tokenizer, "use the tokenizer of a chat model, or set `tokenizer.chat_template`.")
    if not tokenizer.is_fast:
        raise ValueError(
            f"Finding assistant turns needs a fast tokenizer (character offsets); {type(tokenizer).__name__} is not."
            " Load it with `use_fast=True`."
        )
    if _GENERATION_TAG.search(tokenizer.chat_template):
        encoded = apply_template(
            tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            tokenizer_kwargs={"return_offsets_mapping": True},
        )  # fmt: skip
        ids, offsets, mask = list(encoded["input_ids"]), encoded["offset_mapping"], encoded["assistant_masks"]
        full = None
    else:
        full = render(tokenizer, messages)
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        spans = _assistant_spans_from_prefixes(messages, tokenizer, full)
        mask = [int(any(a < end and start < b for start, end in spans)) for a, b in offsets]
    opening = _opening_length(messages, tokenizer, full)
    labels = [token if keep and a >= opening else IGNORE_INDEX for token, keep, (a, _) in zip(ids, mask, offsets)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _assistant_spans_from_prefixes(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, full: str
) -> list[tuple[int, int]]:
    """Each answering assistant turn's characters: what rendering up to it adds over rendering up to its prompt."""
    spans = []
    for index in range(_first_user(messages) + 1, len(messages)):
        if messages[index]["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        answered = render(tokenizer, messages[: index + 1])
        check_extends(prompt, answered, f"the generation prompt before turn {index}")
        check_extends(answered, full, f"the conversation up to turn {index}")
        spans.append((len(prompt), len(answered)))
    return spans


def _opening_length(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, full: Optional[str]) -> int:
    """How many characters the turns before the first user turn take when an assistant turn is among them: that
    greeting is context. 0 when there is none."""
    first_user = _first_user(messages)
    if not any(message["role"] == "assistant" for message in messages[:first_user]):
        return 0
    opening = render(tokenizer, messages[:first_user])
    full = render(tokenizer, messages) if full is None else full
    check_extends(opening, full, "the turns before the first user turn")
    return len(opening)
