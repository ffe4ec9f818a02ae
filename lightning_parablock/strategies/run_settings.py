"""What defines a federated run: saved in its checkpoints and compared when it resumes.

A resume continues the run it was saved from, or it is refused before training: another method, staleness,
seed, schedule, participation, weighting, compression, aggregator, optimizer-state policy, global learning rate,
number of local steps or learning-rate schedule (its kind, warmup and, when it decays, its length in local steps)
would train a different run from the checkpoint's pending deltas (a top-k checkpoint resumed without top-k would
drop every client's error-feedback residual). Settings that are safe to change by construction are not recorded:
how many rounds (``max_epochs``, ``max_steps``, unless the learning rate decays over them), where deltas live
(``offload_deltas``), the modelled link, ``comm_timeout``, checkpoint cadence, logging and the device. A
checkpoint written before a setting was recorded is compared only on what it holds.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_parablock.aggregation.mean import MeanAggregator
from lightning_parablock.aggregation.median import MedianAggregator
from lightning_parablock.aggregation.stacking import StackingAggregator
from lightning_parablock.aggregation.trimmed_mean import TrimmedMeanAggregator

_CONSTANT_LR = {"lr_schedule": "constant", "warmup_steps": 0, "lr_schedule_steps": None, "min_lr_ratio": 0.0}

RunSettings = dict[str, Any]
"""Setting name to a plain value (a number, a string, a list or ``None``), so a weights-only load reads it."""


def check_same_settings(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint_path: Any) -> None:
    """Refuse a resume whose settings differ from those ``saved`` in the checkpoint, naming every one of them."""
    saved = upgraded(saved)
    changed = [(name, saved[name], value) for name, value in current.items() if name in saved and saved[name] != value]
    if not changed:
        return
    differences = "; ".join(f"{name}: {old!r} in the checkpoint, {new!r} now" for name, old, new in changed)
    raise MisconfigurationException(
        f"The checkpoint {checkpoint_path} belongs to another run ({differences}). A resume continues the run it"
        " was saved from: resume with the checkpoint's settings, or start a new run from its weights (load them"
        " into the module, e.g. `load_state_dict(torch.load(path)['state_dict'])`, and fit without `ckpt_path`)."
    )


def upgraded(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Settings saved by an earlier version, in today's terms: before 0.2 one ``Aggregator(method=...)`` class
    served every rule (its repr named unused arguments) and ``weighting`` was the strategy's; before learning-rate
    schedules every run trained at a constant rate."""
    settings = dict(saved)
    if "local_steps" in settings:  # recorded settings from before learning-rate schedules: the rate was constant
        for name, value in _CONSTANT_LR.items():
            settings.setdefault(name, value)
    aggregator = settings.get("aggregator")
    if isinstance(aggregator, str) and aggregator.startswith(("Aggregator(", "StackingAggregator(")):
        rule = _rule_of(aggregator, settings.get("weighting", "uniform"))
        settings["aggregator"] = repr(rule)
        if "weighting" in settings:
            settings["weighting"] = rule.weighting  # a median or trimmed mean never used the strategy's weights
    return settings


def _rule_of(legacy: str, weighting: str) -> Any:
    """Today's aggregator for the repr of one saved before 0.2 (its arguments are literals)."""
    call = ast.parse(legacy, mode="eval").body
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name), legacy
    arguments = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    nonfinite = arguments.get("nonfinite", "raise")
    if call.func.id == "StackingAggregator":
        return StackingAggregator(weighting=weighting, nonfinite=nonfinite)
    method, clip_norm = arguments.get("method", "mean"), arguments.get("clip_norm")
    if method == "median":
        return MedianAggregator(clip_norm=clip_norm, nonfinite=nonfinite)
    if method == "trimmed_mean":
        return TrimmedMeanAggregator(arguments.get("trim_fraction", 0.1), clip_norm=clip_norm, nonfinite=nonfinite)
    return MeanAggregator(weighting=weighting, clip_norm=clip_norm, nonfinite=nonfinite)
