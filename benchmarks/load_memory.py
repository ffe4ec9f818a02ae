"""Peak host memory while ``CausalLMModule`` loads a ~1B-parameter Llama-shaped checkpoint in bf16.

The checkpoint (Llama 3.2 1B's shape: hidden 2048, 16 layers, vocabulary 128256, tied embeddings; 1.24B
parameters) is written first with random bf16 weights, in a process of its own. A fresh process then imports
the package, reads its resident set size (the baseline), loads the checkpoint through
``CausalLMModule(model_name_or_path=..., dtype="bfloat16").configure_model()`` and reads its peak resident set
size, once right after loading (safetensors files are memory-mapped: pages come in when read) and once after
every weight has been read (what a move to the GPU or a forward does). The target: that peak above the baseline
at most 1.3 × the bf16 weights (no fp32 copy on the way).

    python benchmarks/load_memory.py                  # writes ~2.5 GB into a temporary folder
    python benchmarks/load_memory.py --folder ckpt    # keep (and reuse) the checkpoint there
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                tie_word_embeddings=True)  # fmt: skip
TARGET = 1.3

WRITE = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model(**{config})
config.dtype = torch.bfloat16
with torch.device("meta"):
    shapes = {{n: p.shape for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}}
shapes.pop("lm_head.weight", None)  # tied to the embedding
generator = torch.Generator().manual_seed(0)
weights = {{n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}}
save_file(weights, sys.argv[1] + "/model.safetensors", metadata={{"format": "pt"}})
config.save_pretrained(sys.argv[1])
"""

MEASURE = """
import json, resource, sys
from lightning_parablock.core.sizes import nbytes_of
from lightning_parablock.module import CausalLMModule

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024

baseline = rss()
module = CausalLMModule(model_name_or_path=sys.argv[1], dtype="bfloat16")
module.configure_model()
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for param in module.parameters():  # read every weight once, as a move to the GPU or a forward does
    param.detach().sum()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = nbytes_of(module.parameters())
dtypes = sorted({str(p.dtype) for p in module.parameters()})
print(json.dumps(dict(baseline=baseline, loaded=loaded, peak=peak, weights=weights, dtypes=dtypes,
                      parameters=sum(p.numel() for p in module.parameters()))))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="where the checkpoint is (or is written); a temporary folder by default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.folder or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "model.safetensors").exists():
            subprocess.run([sys.executable, "-c", WRITE.format(config=LLAMA_1B), str(folder)], check=True)
        measured = subprocess.run(
            [sys.executable, "-c", MEASURE, str(folder)], check=True, capture_output=True, text=True
        ).stdout
        result = json.loads(measured.strip().splitlines()[-1])
    gib = 2**30
    growth = result["peak"] - result["baseline"]
    ratio = growth / result["weights"]
    print(f"parameters: {result['parameters'] / 1e9:.2f}B, loaded as {', '.join(result['dtypes'])}")
    print(f"bf16 weights:                        {result['weights'] / gib:6.2f} GiB")
    print(f"interpreter baseline:                {result['baseline'] / gib:6.2f} GiB (after importing the package)")
    loaded, peak = result["loaded"] / gib, result["peak"] / gib
    print(f"peak RSS after from_pretrained:      {loaded:6.2f} GiB (safetensors are mapped, not yet read)")
    print(f"peak RSS after reading every weight: {peak:6.2f} GiB")
    print(f"peak above the baseline:             {growth / gib:6.2f} GiB = {ratio:.2f} x the bf16 weights", end="")
    print(f" (target <= {TARGET})")
    print("command: python benchmarks/load_memory.py" + (f" --folder {args.folder}" if args.folder else ""))


if __name__ == "__main__":
    main()
