"""EleutherAI's lm-evaluation-harness on the in-memory global model: GSM8K as the Open LLM Leaderboard scores it.

The harness's own ``HFLM`` wraps the model and tokenizer and its own tasks run unchanged (``gsm8k``: 5-shot
``Question: ...\\nAnswer:`` prompts, greedy, stop at ``Question:``, ``strict-match`` on ``#### N`` and
``flexible-extract`` on the last number), so a score here is the score ``python -m lm_eval --model hf`` gives the
same weights. Any other task comes by name.

Offline, a task reads its data from local files: :func:`write_local_task` writes a task file that ``include``\\ s
lm-eval's own task and changes only where its dataset comes from. lm-eval reads that folder as an
``include_path`` (``TaskManager(include_path=...)`` here, ``--include_path`` on its command line).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
import yaml
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from lightning_parablock.data.loading import FILE_BUILDERS, DataFiles
from lightning_parablock.eval.global_model import GlobalModelEvaluation
from lightning_parablock.files import write_text_atomic

if TYPE_CHECKING:
    import lightning.pytorch as pl

LM_EVAL_INSTALL = "pip install 'lm-eval>=0.4.13'"


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ImportError(f"LMEvalHarness needs EleutherAI's lm-evaluation-harness: {LM_EVAL_INSTALL}.") from None
    return lm_eval


def builtin_task_file(task: str) -> Path:
    """The YAML file that defines lm-eval's built-in ``task``.

    Looks in ``lm_eval/tasks/<task>/`` first (``gsm8k`` lives there); otherwise searches lm-eval's whole task
    index, which reads every task file and takes several seconds.
    """
    from lm_eval.tasks import TaskManager

    folder = Path(_lm_eval().__file__).parent / "tasks" / task
    entry = TaskManager(include_path=folder, include_defaults=False).task_index.get(task) if folder.is_dir() else None
    if entry is None or entry.yaml_path is None:
        entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ValueError(
            f"lm-eval has no task {task!r} defined in a YAML file, so its data cannot be redirected to local files;"
            " list the tasks with `python -m lm_eval ls tasks`."
        )
    return Path(entry.yaml_path)


def _file_builder(data_files: DataFiles) -> str:
    groups = data_files.values() if isinstance(data_files, Mapping) else [data_files]
    files = [file for group in groups for file in ([group] if isinstance(group, str) else group)]
    builders = {FILE_BUILDERS.get(Path(file).suffix.lower()) for file in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"Cannot tell the file type of `data_files={data_files!r}`; use files of one of the types"
            f" {sorted(FILE_BUILDERS)}."
        )
    return builders.pop()


def _absolute(data_files: DataFiles) -> DataFiles:
    """lm-eval resolves relative paths against its working directory; a task file must not depend on that."""
    if isinstance(data_files, str):
        return str(Path(data_files).resolve())
    if isinstance(data_files, Mapping):
        return {split: _absolute(files) for split, files in data_files.items()}
    return [str(Path(file).resolve()) for file in data_files]


def write_local_task(
    directory: Union[str, Path],
    task: str,
    data_files: Optional[DataFiles] = None,
    dataset_path: Optional[str] = None,
    dataset_name: Optional[str] = None,
) -> Path:
    """Write ``directory/<task>.yaml``: lm-eval's ``task`` unchanged except where its data comes from.

    Args:
        data_files: Local files per split, named as the task's config names its splits, e.g. for ``gsm8k``
            ``{"train": "gsm8k_train.parquet", "test": "gsm8k_test.parquet"}`` (``train`` holds the few-shot
            examples). json, jsonl, parquet or csv.
        dataset_path: Instead, any ``datasets.load_dataset`` path: a local copy of the Hub dataset, another repo.
        dataset_name: The configuration of ``dataset_path`` (none for files).

    Returns:
        The file written; pass its folder to lm-eval as ``include_path``.
    """
    if (data_files is None) == (dataset_path is None):
        raise ValueError(f"Give task {task!r} either `data_files` or a `dataset_path`, not both or neither.")
    config: dict[str, Any] = {"include": str(builtin_task_file(task)), "task": task}
    if data_files is not None:
        files = {"data_files": _absolute(data_files)}
        config.update(dataset_path=_file_builder(data_files), dataset_name=None, dataset_kwargs=files)
    else:
        config.update(dataset_path=dataset_path, dataset_name=dataset_name)
    return write_text_atomic(Path(directory) / f"{task}.yaml", yaml.safe_dump(config, sort_keys=False))


@contextmanager
def _own_random_state(device: torch.device) -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators; training must not notice it ran."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def run_lm_eval(
    lm: Any,
    tasks: Sequence[str],
    include_path: Optional[Union[str, Path]] = None,
    local_tasks: Sequence[str] = (),
    num_fewshot: Optional[int] = None,
    limit: Optional[Union[int, float]] = None,
    max_gen_toks: Optional[int] = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of any lm-eval ``LM`` on ``tasks``, with lm-eval's default seeds.

    Tasks named in ``local_tasks`` are read from ``include_path`` only, so lm-eval's index of its thousands of
    built-in tasks is built only when some task is not local.

    Returns:
        lm-eval's output: ``["results"]`` per task ``"metric,filter"`` to value, and with ``log_samples`` each
        document's prompt, responses and filtered responses under ``["samples"]``.
    """
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    everything_local = include_path is not None and set(tasks) <= set(local_tasks)
    manager = TaskManager(include_path=include_path, include_defaults=not everything_local)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        gen_kwargs=None if max_gen_toks is None else {"max_gen_toks": max_gen_toks},
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=log_samples,
    )
    return output


def evaluate_with_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    include_path: Optional[Union[str, Path]] = None,
    local_tasks: Sequence[str] = (),
    num_fewshot: Optional[int] = None,
    limit: Optional[Union[int, float]] = None,
    batch_size: int = 8,
    max_gen_toks: Optional[int] = None,
    max_length: Optional[int] = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's ``tasks`` on an in-memory model through its ``HFLM``, as ``python -m lm_eval --model hf``
    runs them on the saved model.

    The model comes back in the train/eval mode it was in, and Python's, NumPy's and torch's random states as they
    were. Returns lm-eval's output (see :func:`run_lm_eval`); :func:`flatten_scores` names its ``["results"]``.
    """
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    was_training = model.training
    try:
        with _own_random_state(device):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            return run_lm_eval(lm, tasks, include_path, local_tasks, num_fewshot, limit, max_gen_toks, log_samples)
    finally:
        model.train(was_training)


def flatten_scores(results: Mapping[str, Mapping[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """lm-eval's per-task results as flat metric names: ``"exact_match,strict-match"`` of ``gsm8k`` becomes
    ``eval/gsm8k/exact_match/strict-match`` (a ``none`` filter is left out). Standard errors and text are dropped."""
    scores = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{prefix}/{task}/{metric}" + (f"/{filter_name}" if filter_name and filter_name != "none" else "")
            scores[name] = float(value)
    return scores


@dataclass
class LMEvalResult:
    """One lm-eval run on the global model."""

    round: int  # the last round trained (0-based epoch)
    final: bool  # at train end, after ParaBlockCallback's flush: the final global model
    scores: dict[str, float]  # as logged, e.g. {"eval/gsm8k/exact_match/strict-match": 0.55}


class LMEvalHarness(GlobalModelEvaluation):
    """Score the global model with lm-evaluation-harness tasks every n rounds and at train end.

    For GSM8K as the ParaBlock paper reports it (the Open LLM Leaderboard's protocol): ``tasks=["gsm8k"]`` with
    its defaults (5-shot, greedy, ``strict-match`` and ``flexible-extract``), logged as
    ``eval/gsm8k/exact_match/strict-match`` and ``eval/gsm8k/exact_match/flexible-extract``. List it **after**
    :class:`~lightning_parablock.ParaBlockCallback`. Runs on global rank 0; every process logs its scores.

    Args:
        tasks: lm-eval task (or group) names, e.g. ``["gsm8k"]`` or ``["gsm8k", "mmlu"]``.
        every_n_rounds: Also evaluate after every ``n``-th round.
        at_end: Evaluate the final global model at train end.
        num_fewshot: Override the tasks' own few-shot count (gsm8k: 5).
        limit: Only the first ``limit`` documents of each task (a fraction if < 1): a cheaper estimate.
        data_files: Per task, local files per split, e.g. ``{"gsm8k": {"train": "train.parquet", "test":
            "test.parquet"}}``, so the task runs offline (see :func:`write_local_task`).
        dataset_paths: Per task, a ``datasets`` path to read instead of the Hub's, e.g. a local copy.
        task_dir: Where the local task files are written, to rerun the same tasks with lm-eval's command line
            (``--include_path``); by default ``<default_root_dir>/lm_eval_tasks``.
        batch_size: ``HFLM``'s batch size.
        max_gen_toks: Longest generation (lm-eval's default: 256).
        max_length: The context ``HFLM`` allows; by default the model's.
        tokenizer: By default the datamodule's or the module's ``tokenizer`` attribute.
    """

    def __init__(
        self,
        tasks: Sequence[str] = ("gsm8k",),
        every_n_rounds: Optional[int] = None,
        at_end: bool = True,
        num_fewshot: Optional[int] = None,
        limit: Optional[Union[int, float]] = None,
        data_files: Optional[dict[str, DataFiles]] = None,
        dataset_paths: Optional[dict[str, str]] = None,
        task_dir: Optional[str] = None,
        batch_size: int = 8,
        max_gen_toks: Optional[int] = None,
        max_length: Optional[int] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> None:
        super().__init__(every_n_rounds, at_end, tokenizer)
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"`tasks` must be a non-empty list of lm-eval task names, got {tasks!r}.")
        local = {**(data_files or {}), **(dataset_paths or {})}
        both = sorted(set(data_files or {}) & set(dataset_paths or {}))
        if both:
            raise ValueError(f"Task(s) {both} have both `data_files` and a `dataset_paths` entry; give one.")
        unknown = sorted(set(local) - set(tasks))
        if unknown:
            raise ValueError(
                f"`data_files`/`dataset_paths` name task(s) {unknown} that are not in `tasks` {list(tasks)}."
            )
        if num_fewshot is not None and num_fewshot < 0:
            raise ValueError(f"`num_fewshot` must be a non-negative integer or None, got {num_fewshot!r}.")
        for name, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if limit is not None and limit <= 0:
            raise ValueError(f"`limit` must be a positive number of documents (or a fraction < 1), got {limit!r}.")
        _lm_eval()  # a missing install fails at construction, not after the first round
        self.tasks = list(tasks)
        self.num_fewshot = num_fewshot
        self.limit = limit
        self.data_files = dict(data_files or {})
        self.dataset_paths = dict(dataset_paths or {})
        self.task_dir = task_dir
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.max_length = max_length
        self.results: list[LMEvalResult] = []

    @property
    def local_tasks(self) -> list[str]:
        return [task for task in self.tasks if task in self.data_files or task in self.dataset_paths]

    def write_tasks(self, directory: Union[str, Path]) -> Path:
        """Write the task file of every task with local data into ``directory``; returns ``directory``."""
        for task in self.local_tasks:
            write_local_task(directory, task, self.data_files.get(task), self.dataset_paths.get(task))
        return Path(directory)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.hf_model(pl_module)  # fail now rather than after the first round
        self.find_tokenizer(trainer, pl_module)
        if self.task_dir is None:
            self.task_dir = str(Path(trainer.default_root_dir) / "lm_eval_tasks")
        if trainer.is_global_zero and self.local_tasks:
            self.write_tasks(self.task_dir)

    @override
    def evaluate(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", round_index: int, final: bool
    ) -> dict[str, float]:
        scores: Optional[dict[str, float]] = None
        if trainer.is_global_zero:
            output = evaluate_with_lm_eval(
                self.hf_model(pl_module),
                self.find_tokenizer(trainer, pl_module),
                self.tasks,
                self.task_dir if self.local_tasks else None,
                self.local_tasks,
                self.num_fewshot,
                self.limit,
                self.batch_size,
                self.max_gen_toks,
                self.max_length,
            )
            scores = flatten_scores(output["results"])
        scores = trainer.strategy.broadcast(scores, src=0)
        if not scores:
            raise MisconfigurationException(f"lm-eval returned no numeric score for the tasks {self.tasks}.")
        self.results.append(LMEvalResult(round_index, final, scores))
        return scores
