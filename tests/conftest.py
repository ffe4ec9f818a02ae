import os

import pytest
import torch
import torch.distributed as dist

# One thread per test process (and its subprocesses, which inherit the variable): with torch's default of a
# thread per core, a busy 2-core machine runs the suite many times slower. `OMP_NUM_THREADS=4 pytest` overrides.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def tiny_llama_config() -> dict:
    """A ~30k-parameter Llama whose vocabulary fits the character tokenizer (105 tokens) and 48-token sequences."""
    return {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Trainers without a logger write beside the working directory; keep that out of the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank, for code that asks torch.distributed what it is part of."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
