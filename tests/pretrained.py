"""Tiny pretrained checkpoints that the tests save themselves: a Llama in fp32 or bf16 with the character
tokenizer and a chat template, the way a Hub chat model ships."""

import json
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


def save_custom_code_checkpoint(folder: Path, marker: Path, model_type: str = "parablock_custom") -> Path:
    """A tiny checkpoint that ships Python code of its own, as Hub repositories with ``auto_map`` do: a config, a
    model, a tokenizer and a ``custom_generate`` function, each writing ``marker`` when imported. With a
    ``model_type`` transformers knows (``llama``) the config and model load natively; the tokenizer's class is
    still only in its own code."""
    save_tiny_checkpoint(folder)
    wrote_marker = f"import pathlib\npathlib.Path({str(marker)!r}).write_text(__name__)\n"
    code = {
        "configuration_custom.py": "from transformers import LlamaConfig\n\n"
        f"class CustomConfig(LlamaConfig):\n    model_type = {model_type!r}\n",
        "modeling_custom.py": "from transformers import LlamaForCausalLM\n"
        "from .configuration_custom import CustomConfig\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n",
        "tokenization_custom.py": "from transformers import PreTrainedTokenizerFast\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n",
        "custom_generate/generate.py": "def generate(model, *args, **kwargs):\n"
        "    raise RuntimeError('custom generate ran')\n",
    }
    for name, text in code.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(wrote_marker + text)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, architectures=["CustomModel"], auto_map={
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel",
    })  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(
        tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder
