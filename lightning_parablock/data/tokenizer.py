"""Tokenizers: any pretrained one made ready for padded SFT batches, and a character-level one built locally,
so tests and recipes need no hub download.

Every printable ASCII character is one token, so each digit is its own token and arithmetic stays
learnable by a tiny model. The fixed phrases of the Alpaca template are single tokens as well: spelled
out character by character the template alone would be ~150 tokens, longer than the whole sequence a
tiny model is trained on.
"""

import os
from typing import Union

from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_parablock.data.prompts import (
    INPUT_HEADER,
    INSTRUCTION_HEADER,
    PREAMBLE_NO_INPUT,
    PREAMBLE_WITH_INPUT,
    RESPONSE_HEADER,
)
from lightning_parablock.pretrained import load_pretrained

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
_CHARACTERS = ("\n", *(chr(code) for code in range(32, 127)))
_TEMPLATE_PHRASES = (PREAMBLE_NO_INPUT, PREAMBLE_WITH_INPUT, INSTRUCTION_HEADER, INPUT_HEADER, RESPONSE_HEADER)

CHAR_VOCAB_SIZE = len(_SPECIAL_TOKENS) + len(_CHARACTERS) + len(_TEMPLATE_PHRASES)
"""``len(build_char_tokenizer())`` (105): a model's ``vocab_size`` must be at least this."""


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tokenizer; ids are fixed, so any two builds (and saved copies) agree.

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then newline and ASCII 32-126, then the
    Alpaca template phrases. Any other character encodes to ``<unk>``. ``encode`` adds no bos/eos;
    :func:`~lightning_parablock.data.formatting.tokenize_for_sft` adds them where training needs them.
    """
    vocab = {token: index for index, token in enumerate(_SPECIAL_TOKENS + _CHARACTERS)}
    # BPE without merges and without a pre-tokenizer splits text into single characters.
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in _SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(phrase, normalized=False) for phrase in _TEMPLATE_PHRASES])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(tokenizer: Union[str, os.PathLike, PreTrainedTokenizerBase]) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` for a name or folder (an object passes through), with a pad token; the
    tokenizer's own code is never run (see :mod:`~lightning_parablock.pretrained`).

    Base models such as Llama 3 ship without a pad token; batches need one, so eos stands in. Padding never
    reaches the loss (its labels are ``-100``) nor attention (its mask is 0), so the choice does not matter.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, "tokenizer", tokenizer)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"The tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token; set"
                " `tokenizer.pad_token` before passing it."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

