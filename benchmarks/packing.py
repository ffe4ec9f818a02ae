"""Training tokens/s with and without packing, on examples as long as Alpaca-GPT4's.

The examples are the fixture ``tests/fixtures/alpaca_gpt4.json`` (119 Alpaca-GPT4 rows) in the Alpaca-LoRA
prompt, tokenized by a byte-level BPE tokenizer trained here on the same text (no download; about four
characters a token, as Llama's), so the lengths follow Alpaca's distribution. The same examples are read through
``FederatedDataModule`` once with ``packing=False`` (batches padded to their longest example) and once with
``packing=True`` (rows of ``max_length`` tokens), and a small Llama built from a config trains on every batch of
one pass with AdamW. Tokens/s counts real tokens (padding left out) per second of forward, backward and step.

    python benchmarks/packing.py                 # CPU: hidden 128, 2 layers, max_length 512, batch 4
    python benchmarks/packing.py --device cuda --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_parablock.data import FederatedDataModule
from lightning_parablock.module import CausalLMModule

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "alpaca_gpt4.json"


def bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tokens_per_second(data: FederatedDataModule, args: argparse.Namespace, vocab_size: int) -> tuple[float, float]:
    """Real tokens per second of training over one pass, and the share of padding in the batches."""
    torch.manual_seed(0)
    config = dict(model_type="llama", vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                  max_position_embeddings=args.max_length)  # fmt: skip
    module = CausalLMModule(config=config, attn_implementation="sdpa")
    module.configure_model()  # outside a Trainer the model is built on request
    module.to(args.device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batches = [{k: v.to(args.device) for k, v in batch.items()} for batch in data.train_dataloader()]
    pad = data.tokenizer.pad_token_id
    real = sum(int((b["input_ids"] != pad).sum()) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    for batch in batches[:2]:  # warm-up
        module(**batch).loss.backward()
        optimizer.zero_grad()
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.passes):
        for batch in batches:
            module(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return args.passes * real / (time.perf_counter() - start), 1 - real / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--passes", type=int, default=1)
    args = parser.parse_args()
    rows = json.loads(FIXTURE.read_text())
    tokenizer = bpe_tokenizer([f"{r['instruction']} {r['input']} {r['output']}" for r in rows], vocab_size=4096)
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        for packing in (False, True):
            data = FederatedDataModule(
                dataset={"data_files": str(FIXTURE)}, tokenizer=tokenizer, max_length=args.max_length,
                batch_size=args.batch_size, packing=packing, cache_dir=cache,
            )  # fmt: skip
            data.setup()
            lengths = sorted(len(ids) for ids in data.train_dataset["input_ids"])
            results[packing] = tokens_per_second(data, args, len(tokenizer))
    median = lengths[len(lengths) // 2]
    print(f"{len(lengths)} examples, tokens per example: median {median}, max {lengths[-1]} (cut at {args.max_length})")
    for packing, (speed, padding) in results.items():
        print(f"packing={str(packing):5}  {speed:9.0f} tokens/s  padding {padding:5.1%} of batch positions")
    print(f"speed-up with packing: {results[True][0] / results[False][0]:.2f}x")
    print("command: python benchmarks/packing.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()
