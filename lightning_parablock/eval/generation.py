"""Batched generation with a Hugging Face causal LM, returning only what the model wrote.

Greedy decoding (the default) makes an evaluation a pure function of the weights, so two rounds (or two runs)
differ only because their models do. Prompts are left-padded, so every row's continuation starts right after
its own last prompt token, and sorted by length first, so a batch wastes little compute on padding.
"""

from collections.abc import Sequence
from typing import Callable, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """``bos`` + the prompt's tokens, as :func:`~lightning_parablock.data.tokenize_for_sft` builds training prompts.

    A ``bos`` already at the start of the text (a chat template often writes one) is not doubled; a tokenizer
    without a ``bos`` token gets none.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(
            f"{type(tokenizer).__name__} defines neither a pad nor an eos token; batched generation needs one"
            " of them to left-pad prompts. Set `tokenizer.pad_token` first."
        )
    return pad


@torch.no_grad()
def generate_token_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
) -> list[list[int]]:
    """The new tokens of each prompt's continuation, in input order, special tokens and padding included.

    Greedy for ``temperature == 0``, else sampled at that temperature (the model's ``generation_config`` supplies
    any other sampling setting, as ``model.generate`` does). Generation of a row may end early once it contains
    one of the ``stop`` strings; cutting there is the caller's. The model is put in eval mode (no dropout) for the
    call and given back in the mode it was in.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
    if temperature < 0:
        raise ValueError(f"`temperature` must be 0 (greedy) or positive, got {temperature!r}.")
    empty = [index for index, ids in enumerate(prompt_ids) if not ids]
    if empty:
        raise ValueError(f"Prompts at positions {empty[:10]} encode to no tokens; every prompt needs at least one.")
    pad = _pad_token_id(tokenizer)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    stopping = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    order = sorted(range(len(prompt_ids)), key=lambda index: len(prompt_ids[index]))
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompt_ids[index]) for index in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, index in enumerate(rows):
                ids = prompt_ids[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                **sampling,
                **stopping,
            )
            for index, new in zip(rows, generated[:, width:].tolist()):
                outputs[index] = new
    finally:
        model.train(was_training)
    return outputs


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first of the ``stop`` strings, as lm-evaluation-harness's ``until`` cuts."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def generate_from_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations of already-tokenized prompts, decoded without special tokens and cut before the
    first ``stop`` string, in input order."""
    generated = generate_token_ids(model, tokenizer, prompt_ids, batch_size, max_new_tokens, stop)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [cut_at_stop(text, stop) for text in texts]


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    prompt_fn: Optional[Callable[[str], str]] = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy answers to ``questions``, each asked as ``prompt_fn(question)`` (the question itself if ``None``).

    Returns:
        Only the generated continuation of each prompt, cut before the first ``stop`` string, in the order of
        ``questions``.
    """
    prompts = [prompt_fn(question) if prompt_fn is not None else question for question in questions]
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    return generate_from_ids(model, tokenizer, prompt_ids, batch_size, max_new_tokens, stop)
