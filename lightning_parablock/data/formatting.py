"""Prompt-masked tokenization for supervised fine-tuning (the prompts themselves: :mod:`.prompts`).

Instruction tuning trains only on the answer: the prompt is context, so its tokens get label ``-100``
and the loss covers the response and the closing eos, which teaches the model where to stop.
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from lightning_parablock.data.chat_template import check_extends, render

IGNORE_INDEX = -100
"""Label value that ``torch.nn.CrossEntropyLoss`` (and so every HF causal LM) leaves out of the loss."""


def chat_prompt_and_response(
    tokenizer: PreTrainedTokenizerBase, instruction: str, input: Optional[str], response: str
) -> tuple[str, str]:
    """Render one user turn and the assistant's answer with the tokenizer's chat template, split where the answer
    starts: the prompt is the conversation up to the generation prompt, the response everything the template adds
    after it (the answer and its end-of-turn markers), so the loss covers exactly what the model must generate.
    """
    user = {"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}
    prompt = render(tokenizer, [user], add_generation_prompt=True)
    full = render(tokenizer, [user, {"role": "assistant", "content": response}])
    check_extends(prompt, full, "the prompt")
    return prompt, full[len(prompt) :]


def encode_for_sft(
    prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool = True
) -> dict[str, list[int]]:
    """Tokenize ``bos + prompt + response + eos`` with labels ``-100`` on ``bos + prompt``, uncut (no bos for a
    tokenizer without one).

    Prompt and response are tokenized separately so the mask boundary is exact. With ``add_special_tokens=False``
    no bos or eos is added: a chat template writes its own.
    """
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    if add_special_tokens:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"`tokenizer` must define an eos token to end responses, got eos={tokenizer.eos_token!r}; use a"
                " chat template (`prompt_format='chat'`) if it writes its own."
            )
        if tokenizer.bos_token_id is not None:  # Qwen2.5 has none; generation then adds none either
            prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
        response_ids = [*response_ids, tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def truncate(features: dict[str, list[int]], max_length: int) -> dict[str, list[int]]:
    """Cut every list from the right to ``max_length``; an over-long prompt leaves no supervised token at all."""
    if max_length < 1:
        raise ValueError(f"`max_length` must be a positive integer, got {max_length}.")
    return {key: values[:max_length] for key, values in features.items()}


def tokenize_for_sft(
    prompt: str,
    response: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    add_special_tokens: bool = True,
) -> dict[str, list[int]]:
    """:func:`encode_for_sft` cut to ``max_length`` from the right.

    Returns:
        Lists ``input_ids``, ``attention_mask`` and ``labels`` of equal length, at most ``max_length``.
    """
    return truncate(encode_for_sft(prompt, response, tokenizer, add_special_tokens), max_length)


@dataclass(frozen=True)
class SFTCollator:
    """Right-pad a list of :func:`tokenize_for_sft` outputs into a batch of ``torch.long`` tensors.

    Padding positions get ``pad_token_id`` in ``input_ids``, ``0`` in ``attention_mask`` and ``-100`` in
    ``labels``, so they neither attend nor count towards the loss.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("`SFTCollator` got an empty list of features; pass at least one example.")
        width = max(len(feature["input_ids"]) for feature in features)
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor(
                [list(feature[key]) + [pad] * (width - len(feature[key])) for feature in features], dtype=torch.long
            )
            for key, pad in pad_values.items()
        }
