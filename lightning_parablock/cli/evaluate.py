"""``parablock evaluate``: a saved model's accuracy on your own chat data.

    parablock evaluate runs/llama32_1b_chat/final_model --data eval.jsonl [--pattern '#### (\\S+)'] [--output a.jsonl]

``MODEL`` is a folder ``save_pretrained`` or ``parablock fit --output_dir`` wrote (``config.json``, the weights and
the tokenizer with its chat template), or a run's folder holding one (the newest under it). Each conversation of
``--data`` is answered greedily, in batches, with the saved chat template, and scored against its last assistant
turn by exact match or ``--pattern`` (:mod:`lightning_parablock.eval.chat_answers`). Remote code is never trusted.
The weights load in their saved dtype, except half precision on a CPU without instructions for it, which loads in
float32 (a note says so); ``--dtype`` chooses.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lightning_parablock.cli.output_folder import MARKER
from lightning_parablock.core.cpu_half import missing_half_instructions
from lightning_parablock.data.tokenizer import load_tokenizer
from lightning_parablock.eval.chat_answers import AnswerMatch, check_chat_tokenizer, load_chat_examples, score_chat
from lightning_parablock.eval.mtbench import write_jsonl_atomic
from lightning_parablock.pretrained import ADAPTER_CONFIG

DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(
    args: Optional[Sequence[str]] = None, *, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
) -> None:
    """Parse ``parablock evaluate``'s arguments, check them all, then answer, score and print (and write)."""
    parser = parser_class(prog="parablock evaluate", description=__doc__.split("\n\n")[0])
    argument = parser.add_argument
    argument("model", type=Path, help="a saved model folder (config.json, weights, tokenizer), or a run folder")
    argument("--data", type=Path, required=True, help="JSON lines with `messages`; the last answer is the reference")
    argument(
        "--pattern",
        default=None,
        help="score by what this regular expression finds in answer and reference (its group `answer`, else group 1,"
        " else the match); default: exact match",
    )
    argument("--output", type=Path, default=None, help="write every answer, its reference and score here (JSON lines)")
    argument("--overwrite", action="store_true", help="replace an existing --output file")
    argument("--tokenizer", default=None, help="the tokenizer with the chat template (default: the model folder's)")
    argument("--limit", type=int, default=None, help="the first N conversations only")
    argument("--batch_size", type=int, default=8, help="conversations per generate call (default: %(default)s)")
    argument("--max_new_tokens", type=int, default=256, help="longest answer in tokens (default: %(default)s)")
    argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the weights (default: the saved one; float32 for half precision on a CPU without instructions"
        " for it)",
    )
    argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    options = parser.parse_args(args)
    try:
        folder = find_model_folder(options.model)
        match = AnswerMatch(options.pattern)
        examples = load_chat_examples(options.data, options.limit)
        match.check_references(examples, str(options.data))
        for name in ("batch_size", "max_new_tokens"):
            if getattr(options, name) < 1:
                raise ValueError(f"`--{name}` must be a positive integer, got {getattr(options, name)}.")
        if options.output is not None and options.output.exists() and not options.overwrite:
            raise ValueError(
                f"`--output {options.output}` exists; choose another file or pass --overwrite to replace it."
            )
        device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = load_tokenizer(options.tokenizer or str(folder))
        check_chat_tokenizer(tokenizer)
        model, note = load_model(folder, options.dtype, device)
    except (OSError, ValueError, RuntimeError) as error:
        parser.error(str(error))
    print(f"model: {folder} ({str(model.dtype).removeprefix('torch.')} on {device}){f'; {note}' if note else ''}")
    print(f"data: {options.data}, {len(examples)} conversations, scored by {match!r}")
    score = score_chat(model, tokenizer, examples, match, options.batch_size, options.max_new_tokens)
    print(f"accuracy: {score.correct}/{score.count} = {100 * score.accuracy:.1f}%")
    if options.output is not None:
        write_jsonl_atomic(score.rows, options.output)
        print(f"answers written to {options.output}")


def find_model_folder(path: Path) -> Path:
    """``path`` when it holds a model (``config.json``), else the newest model folder ``parablock fit`` wrote in it."""
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; give a saved model folder or a run folder holding one.")
    if (path / "config.json").is_file():
        return path
    if (path / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{str(path)!r} holds a LoRA adapter alone; evaluate the merged model folder it sits in"
            f" ({str(path.parent)!r})."
        )
    written = [marker.parent for marker in path.rglob(MARKER) if (marker.parent / "config.json").is_file()]
    if not written:
        raise FileNotFoundError(
            f"{str(path)!r} holds no model: give a folder with a config.json (what `save_pretrained` or `parablock fit"
            " --output_dir` writes), or a run folder holding one."
        )
    return max(written, key=lambda folder: (folder / MARKER).stat().st_mtime)


def load_model(folder: Path, dtype: str, device: torch.device) -> tuple[PreTrainedModel, Optional[str]]:
    """The model of ``folder`` on ``device`` in ``dtype`` (``auto``: the saved one, float32 instead of a half precision
    this CPU has no instructions for), and a note when that replaced the saved dtype."""
    note = None
    chosen: torch.dtype | str = "auto" if dtype == "auto" else getattr(torch, dtype)
    if dtype == "auto" and device.type == "cpu":
        saved = getattr(AutoConfig.from_pretrained(folder, trust_remote_code=False), "dtype", None)
        saved = getattr(torch, saved) if isinstance(saved, str) else saved
        missing = missing_half_instructions(saved) if isinstance(saved, torch.dtype) else None
        if missing is not None:
            chosen = torch.float32
            saved_name = str(saved).removeprefix("torch.")
            note = f"saved in {saved_name}, loaded in float32: this CPU has no {' or '.join(missing)}"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=chosen, trust_remote_code=False)
    return model.to(device).eval(), note

