"""What the benchmarks share: the tiny recipe's model, and Trainer settings that time training alone."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
TINY_CONFIG: dict = yaml.safe_load(TINY_RECIPE.read_text())["model"]["init_args"]["config"]
"""The tiny recipe's Llama config: a model every benchmark can build in seconds on a CPU."""

TIMING_ONLY = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
)
"""Trainer settings that leave only training in a timed fit: no logging, checkpoints, summary or validation."""
