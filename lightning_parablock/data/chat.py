"""Multi-turn chat data: conversations checked into one shape, rendered with the tokenizer's chat template, and
the loss on every assistant turn and on nothing else.

Two layouts are read: a ``messages`` column of ``{role, content}`` turns (OpenAI / TRL), and ShareGPT's
``conversations`` of ``{from, value}`` turns (``human``/``gpt``/``system``). Both become ``messages``.

Which tokens an assistant wrote comes from the template: where it marks generation (``{% generation %}``),
transformers' ``return_assistant_tokens_mask``; otherwise each assistant turn's characters are found by rendering
the conversation up to that turn with and without it, and the tokens covering them are kept (offsets of a fast
tokenizer), so the loss also covers the end-of-turn markers the template writes after the answer.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_parablock.data.formatting import IGNORE_INDEX

MESSAGES, CONVERSATIONS = "messages", "conversations"
CHAT_COLUMNS = (MESSAGES, CONVERSATIONS)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def chat_column(columns: dict[str, str], available: list[str]) -> Optional[str]:
    """The data's conversation column: the one ``columns`` names (``{messages: ...}``), else ``messages`` or
    ``conversations`` when the data has one and no ``instruction`` column; ``None`` for instruction data."""
    named = columns.get(MESSAGES)
    if named is not None:
        return named
    if "instruction" in columns or "instruction" in available:
        return None
    return next((column for column in CHAT_COLUMNS if column in available), None)


def to_chat_schema(dataset: Dataset, column: str, where: str) -> Dataset:
    """A ``messages`` column of ``{role, content}`` turns from ``column``, plus ``instruction`` (the first user
    turn), an empty ``input`` and ``output`` (the last assistant turn), so evaluation and partitioning read chat
    data as they read instruction data. Other columns are kept, to split clients by.
    """
    if column not in dataset.column_names:
        raise ValueError(
            f"{where} has no column {column!r} of conversations; its columns are {dataset.column_names}. Name it"
            " with `columns: {messages: ...}`."
        )
    replaced = [c for c in dict.fromkeys((column, "instruction", "input", "output")) if c in dataset.column_names]
    return dataset.map(
        _chat_row, with_indices=True, fn_kwargs={"column": column, "where": where}, remove_columns=replaced,
        desc="Reading conversations",
    )  # fmt: skip


def _chat_row(example: dict[str, Any], row: int, column: str, where: str) -> dict[str, Any]:
    turns = check_conversation(example[column], where, row)
    return {
        MESSAGES: turns,
        "instruction": next(t["content"] for t in turns if t["role"] == "user"),
        "input": "",
        "output": [t["content"] for t in turns if t["role"] == "assistant"][-1],
    }


def check_conversation(turns: Any, where: str, row: int) -> list[dict[str, str]]:
    """``turns`` as ``{role, content}`` dicts, refused naming ``where`` and ``row`` when malformed."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}, row {row}: a conversation must be a non-empty list of turns, got {turns!r}.")
    checked = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}, row {row}, turn {index}: a turn must be a dict, got {turn!r}.")
        sharegpt = "from" in turn and turn.get("role") is None
        role = SHAREGPT_ROLES.get(turn.get("from")) if sharegpt else turn.get("role")
        content = turn.get("value") if sharegpt else turn.get("content")
        if role not in ROLES:
            given = turn.get("from") if sharegpt else turn.get("role")
            accepted = sorted(SHAREGPT_ROLES) if sharegpt else list(ROLES)
            raise ValueError(f"{where}, row {row}, turn {index}: unknown role {given!r}; use one of {accepted}.")
        if not isinstance(content, str):
            raise ValueError(
                f"{where}, row {row}, turn {index}: the {role} turn's content must be text, got {content!r}."
            )
        checked.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in checked) or not any(t["role"] == "user" for t in checked):
        raise ValueError(f"{where}, row {row}: a conversation needs a user and an assistant turn to train on.")
    return checked


def encode_conversation(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` of the rendered conversation, uncut; labels are ``-100``
    except on the tokens of assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer {tokenizer.name_or_path!r} has no chat template to render conversations with; use the"
            " tokenizer of a chat model, or set `tokenizer.chat_template`."
        )
    if _GENERATION_TAG.search(tokenizer.chat_template):
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(encoded["input_ids"]), encoded["assistant_masks"]
    else:
        ids, mask = _assistant_mask_from_prefixes(messages, tokenizer)
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _assistant_mask_from_prefixes(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Each assistant turn's characters: what rendering up to it adds over rendering up to its generation prompt."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        answered = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (answered.startswith(prompt) and full.startswith(answered)):
            raise ValueError(
                "The tokenizer's chat template renders a conversation's prefixes differently from the whole"
                f" conversation, so the assistant turns cannot be found: up to turn {index} {answered!r}, prompt"
                f" {prompt!r}. Use a template that marks assistant turns with {{% generation %}}."
            )
        spans.append((len(prompt), len(answered)))
    if not tokenizer.is_fast:
        raise ValueError(
            f"Finding assistant turns needs a fast tokenizer (character offsets); {type(tokenizer).__name__} is not."
            " Load it with `use_fast=True`, or use a template that marks assistant turns with {% generation %}."
        )
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= a and b <= end and a < b for start, end in spans)) for a, b in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask
