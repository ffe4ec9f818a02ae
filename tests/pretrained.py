"""Tiny pretrained checkpoints that the tests save themselves: a Llama in fp32 or bf16 with the character
tokenizer and a chat template, the way a Hub chat model ships."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from lightning_parablock.data import build_char_tokenizer

TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip

_TURN = "{{- '<s>' + message['role'] + '\\n' -}}"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}" + _TURN +
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '</s>' -}}{% endgeneration %}"
    "{%- else -%}{{- message['content'] + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<s>assistant\\n' -}}{%- endif -%}"
)  # fmt: skip
"""Every turn is ``<s>role\\ncontent</s>``; the assistant's content and its ``</s>`` are marked for generation."""

PLAIN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
"""The same rendering without generation marks: assistant spans must be found from the rendered prefixes."""


def chat_tokenizer(template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def save_tiny_checkpoint(
    folder: Path, dtype: torch.dtype = torch.float32, template: str = CHAT_TEMPLATE, **config: object
) -> Path:
    """A random tiny Llama saved in ``dtype`` with its chat tokenizer, loadable by name like a Hub checkpoint;
    ``config`` overrides :data:`TINY_LLAMA` (``initializer_range=0.5`` makes its answers depend on the prompt)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_LLAMA, **config}), dtype=dtype)
    model.save_pretrained(folder)
    chat_tokenizer(template).save_pretrained(folder)
    return folder
