"""Turn an instruction dataset into prompt-masked training features, and say what truncation cost.

Runs through ``datasets.map`` with a fingerprint derived from the data, the tokenizer's content and the options,
so a dataset loaded from files (the Hub, local json/parquet/csv) is tokenized once and then read from the cache.
"""

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from lightning_parablock._compat import dataset_fingerprint, dataset_source_row
from lightning_parablock.data.chat import MESSAGES, encode_conversation
from lightning_parablock.data.chat_template import ChatTemplateError
from lightning_parablock.data.formatting import IGNORE_INDEX, chat_prompt_and_response, encode_for_sft, truncate
from lightning_parablock.data.loading import INPUT, INSTRUCTION, OUTPUT
from lightning_parablock.data.prompts import TEMPLATES, PromptFormat, resolve_prompt_format

_NUM_TOKENS, _NUM_SUPERVISED = "num_tokens", "num_supervised"


@dataclass
class TokenizationReport:
    """What tokenizing one split did: examples in, how many were cut, and which were kept.

    An example whose prompt alone fills ``max_length`` is dropped: it would have no supervised token, and a
    batch of only such examples has no loss at all.
    """

    split: str
    examples: int
    truncated: int
    dropped: int
    max_length: int
    kept: list[int] = field(repr=False, default_factory=list)

    def format(self) -> str:
        text = f"{self.split}: {self.examples} examples, {self.truncated} truncated to max_length={self.max_length}"
        if self.dropped:
            text += f", {self.dropped} dropped (the prompt alone fills max_length)"
        return text


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    prompt_format: PromptFormat = "alpaca_lora",
    split: str = "train",
    num_proc: Optional[int] = None,
    where: str = "the data",
) -> tuple[Dataset, TokenizationReport]:
    """Format and tokenize every example of an ``instruction``/``input``/``output`` dataset, or every conversation
    of a ``messages`` one (rendered with the tokenizer's chat template whatever ``prompt_format`` says, the loss on
    every assistant turn that answers a user). A row the chat template cannot render is refused naming ``where``
    (the file) and the row it was loaded from.

    Returns:
        The dataset with only ``input_ids``, ``attention_mask`` and ``labels`` (labels ``-100`` on the prompt),
        without the dropped examples, and the report; ``report.kept`` are the kept rows of ``dataset``.
    """
    if max_length < 1:
        raise ValueError(f"`max_length` must be a positive integer, got {max_length}.")
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    options = dict(tokenizer=tokenizer, max_length=max_length, prompt_format=fmt)
    fingerprint = Hasher.hash([dataset_fingerprint(dataset), tokenizer_fingerprint(tokenizer), max_length, fmt])
    try:
        tokenized = dataset.map(
            _tokenize_example,
            with_indices=True,
            fn_kwargs=options,
            remove_columns=dataset.column_names,
            num_proc=num_proc,
            new_fingerprint=fingerprint,
            desc=f"Tokenizing {split}",
        )
    except ChatTemplateError as error:
        if error.row is None:
            raise
        raise ValueError(f"{where}, row {dataset_source_row(dataset, error.row)}: {error.problem}") from None
    num_tokens, num_supervised = tokenized[_NUM_TOKENS], tokenized[_NUM_SUPERVISED]
    kept = [index for index, count in enumerate(num_supervised) if count > 0]
    report = TokenizationReport(
        split=split,
        examples=len(dataset),
        truncated=sum(count > max_length for count in num_tokens),
        dropped=len(dataset) - len(kept),
        max_length=max_length,
        kept=kept,
    )
    if report.dropped:
        tokenized = tokenized.select(kept)
    return tokenized.remove_columns([_NUM_TOKENS, _NUM_SUPERVISED]), report


def _tokenize_example(
    example: dict[str, Any], row: int, tokenizer: PreTrainedTokenizerBase, max_length: int, prompt_format: str
) -> dict[str, Any]:
    try:
        features = _encode(example, tokenizer, prompt_format)
    except ChatTemplateError as error:
        raise ChatTemplateError(error.problem, row) from None  # the caller names the file and the row as loaded
    num_tokens = len(features["input_ids"])
    features = truncate(features, max_length)
    num_supervised = sum(label != IGNORE_INDEX for label in features["labels"])
    return {**features, _NUM_TOKENS: num_tokens, _NUM_SUPERVISED: num_supervised}


def _encode(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> dict[str, list[int]]:
    if example.get(MESSAGES) is not None:
        return encode_conversation(example[MESSAGES], tokenizer)
    instruction, input, output = (_text(example[name]) for name in (INSTRUCTION, INPUT, OUTPUT))
    if prompt_format == "chat":
        prompt, response = chat_prompt_and_response(tokenizer, instruction, input, output)
        return encode_for_sft(prompt, response, tokenizer, add_special_tokens=False)
    template = TEMPLATES[prompt_format]
    return encode_for_sft(template.prompt(instruction, input), template.response_prefix + output, tokenizer)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does (vocabulary, rules, special tokens, chat template), not of the object,
    so the same tokenizer loaded twice hits the same ``datasets`` cache and a different one never does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return Hasher.hash(
        [type(tokenizer).__name__, content, tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None)]
    )
