"""lm-evaluation-harness on the in-memory model: its own gsm8k task, offline from fixtures, scored as its CLI does."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

pytest.importorskip("lm_eval")

from helpers import quiet_trainer  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lightning_parablock.data import SyntheticArithmeticDataModule, build_char_tokenizer  # noqa: E402
from lightning_parablock.eval import LMEvalHarness, evaluate_with_lm_eval, write_local_task  # noqa: E402
from lightning_parablock.eval.harness import flatten_scores, run_lm_eval  # noqa: E402
from lightning_parablock.module import CausalLMModule  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K_FILES = {"train": str(FIXTURES / "gsm8k_train.parquet"), "test": str(FIXTURES / "gsm8k_test.parquet")}
STRICT, FLEXIBLE = "eval/gsm8k/exact_match/strict-match", "eval/gsm8k/exact_match/flexible-extract"


class ScriptedAnswers(LM):
    """An lm-eval model that answers each question with the text given for it, to exercise lm-eval's own filters."""

    def __init__(self, answers: dict[str, str], default: str = "") -> None:
        super().__init__()
        self.answers, self.default = answers, default

    def generate_until(self, requests):
        return [self.answers.get(request.doc["question"], self.default) for request in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def _bigram_model(chain: str):
    """A Llama whose next token depends only on the current one: after ``chain[i]`` it writes ``chain[i + 1]``, after
    the last character (and any character not in the chain) eos. Attention and MLP outputs are zero, so the residual
    stream is the token's one-hot embedding and the head reads the transition off it."""
    tokenizer = build_char_tokenizer()
    size = 128
    config = AutoConfig.for_model(
        model_type="llama",
        vocab_size=size,
        hidden_size=size,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(size))
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.fill_(1.0)
        head = model.lm_head.weight  # (next token, current token)
        head[tokenizer.eos_token_id, :] = 1.0
        ids = [tokenizer.convert_tokens_to_ids(character) for character in chain]
        for current, following in zip(ids, ids[1:]):
            head[following, current] = 2.0
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    write_local_task(directory, "gsm8k", GSM8K_FILES)
    return directory


def test_the_local_task_is_lm_evals_gsm8k_reading_local_files(task_dir):
    config = yaml.safe_load((task_dir / "gsm8k.yaml").read_text())
    assert Path(config.pop("include")).parts[-3:] == ("tasks", "gsm8k", "gsm8k.yaml")
    assert config == {
        "task": "gsm8k",
        "dataset_path": "parquet",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": GSM8K_FILES},
    }
    with pytest.raises(ValueError, match="either `data_files` or a `dataset_path`"):
        write_local_task(task_dir, "gsm8k")
    with pytest.raises(ValueError, match=r"file type of `data_files=.*\.txt"):
        write_local_task(task_dir, "gsm8k", {"test": "questions.txt"})


def test_a_task_can_read_a_local_datasets_folder_instead(tmp_path):
    import shutil

    data = tmp_path / "gsm8k_copy"  # a folder laid out as the Hub's: one file per split
    data.mkdir()
    for split, file in GSM8K_FILES.items():
        shutil.copy(file, data / f"{split}-00000-of-00001.parquet")
    write_local_task(tmp_path / "tasks", "gsm8k", dataset_path=str(data))
    output = run_lm_eval(ScriptedAnswers({}, "#### 108"), ["gsm8k"], tmp_path / "tasks", ["gsm8k"], 1, 1)
    assert flatten_scores(output["results"])[STRICT] == 1.0  # the first test question's answer is 108


def test_strict_and_flexible_match_with_lm_evals_own_filters(task_dir):
    import pandas as pd

    questions = list(pd.read_parquet(GSM8K_FILES["test"])["question"][:3])  # 12 * 9, 17 * 5, then any
    answers = {
        questions[0]: "12 * 9 = 108 pens, so the answer is 108.",  # no "#### N": only flexible-extract reads it
        questions[1]: "17 * 5 = 85 pens.\n#### 85",
        questions[2]: "#### 1",
    }
    output = run_lm_eval(ScriptedAnswers(answers), ["gsm8k"], task_dir, ["gsm8k"], 0, 3, log_samples=True)
    scored = {(s["doc_id"], s["filter"]): s["exact_match"] for s in output["samples"]["gsm8k"]}
    assert scored == {
        (0, "strict-match"): 0.0,
        (0, "flexible-extract"): 1.0,
        (1, "strict-match"): 1.0,
        (1, "flexible-extract"): 1.0,
        (2, "strict-match"): 0.0,
        (2, "flexible-extract"): 0.0,
    }
    assert flatten_scores(output["results"]) == {"eval/gsm8k/sample_len": 3.0, STRICT: 1 / 3, FLEXIBLE: 2 / 3}


def _samples(records, prompt):
    """What each logged document shows: its id, filter, prompt, raw responses and filtered responses."""
    return [
        (record["doc_id"], record["filter"], prompt(record), record["resps"], record["filtered_resps"])
        for record in records
    ]


@pytest.mark.slow
def test_in_process_scores_equal_lm_evals_command_line_on_the_saved_model(task_dir, tmp_path):
    model, tokenizer = _bigram_model(": 108")  # answers every "...Answer:" prompt with " 108"
    settings = dict(num_fewshot=2, limit=4, batch_size=2, max_gen_toks=8)
    output = evaluate_with_lm_eval(model, tokenizer, ["gsm8k"], task_dir, ["gsm8k"], log_samples=True, **settings)
    scores = flatten_scores(output["results"])
    # the first of the four questions is 12 * 9: flexible-extract reads 108, strict-match finds no "####"
    assert (scores[STRICT], scores[FLEXIBLE]) == (0.0, 0.25)

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'model'}",
        "--tasks", "gsm8k", "--include_path", str(task_dir), "--device", "cpu",
        "--num_fewshot", "2", "--limit", "4", "--batch_size", "2", "--gen_kwargs", "max_gen_toks=8",
        "--output_path", str(tmp_path / "cli"), "--log_samples",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    [results_file] = (tmp_path / "cli").glob("*/results_*.json")
    [samples_file] = (tmp_path / "cli").glob("*/samples_gsm8k_*.jsonl")
    assert flatten_scores(json.loads(results_file.read_text())["results"]) == scores
    cli_samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    in_process = _samples(output["samples"]["gsm8k"], lambda record: record["arguments"][0][0])
    assert _samples(cli_samples, lambda record: record["arguments"]["gen_args_0"]["arg_0"]) == in_process
    assert [resps for *_, resps, _ in in_process] == [[[" 108"]]] * 8  # 4 questions x 2 filters


def test_evaluation_leaves_the_models_mode_and_every_random_state_as_they_were(task_dir):
    model, tokenizer = _bigram_model(": 108")
    model.train()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    evaluate_with_lm_eval(model, tokenizer, ["gsm8k"], task_dir, ["gsm8k"], num_fewshot=0, limit=1, max_gen_toks=4)
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item())
    assert model.training


def test_callback_scores_the_global_model_at_round_ends_and_at_train_end(tiny_llama_config, tmp_path):
    config = {**tiny_llama_config, "max_position_embeddings": 1024}
    module = CausalLMModule(config=config, learning_rate=0.0, seed=0)  # weights never change
    harness = LMEvalHarness(
        ["gsm8k"], every_n_rounds=1, num_fewshot=0, limit=2, max_gen_toks=4, data_files={"gsm8k": GSM8K_FILES}
    )
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(
        callbacks=[harness], max_epochs=2, limit_val_batches=0, limit_train_batches=1, logger=logger
    )
    datamodule = SyntheticArithmeticDataModule(num_examples=16, val_examples=4, batch_size=4, partition="iid")
    trainer.fit(module, datamodule=datamodule)

    assert [(result.round, result.final) for result in harness.results] == [(0, False), (1, True)]
    expected = evaluate_with_lm_eval(
        module.hf_model, datamodule.tokenizer, ["gsm8k"], harness.task_dir, ["gsm8k"], 0, 2, max_gen_toks=4
    )
    assert all(result.scores == flatten_scores(expected["results"]) for result in harness.results)
    assert Path(harness.task_dir) == Path(trainer.default_root_dir) / "lm_eval_tasks"
    assert trainer.callback_metrics[STRICT].item() == harness.results[0].scores[STRICT]
    logged = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert STRICT in logged and FLEXIBLE in logged


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tasks": "gsm8k"}, "non-empty list of lm-eval task names"),
        ({"data_files": {"mmlu": "x.parquet"}}, r"task\(s\) \['mmlu'\] that are not in `tasks`"),
        ({"data_files": {"gsm8k": "a.parquet"}, "dataset_paths": {"gsm8k": "b"}}, "both `data_files` and"),
        ({"num_fewshot": -1}, "`num_fewshot` must be a non-negative integer"),
        ({"limit": 0}, "`limit` must be a positive number"),
        ({"every_n_rounds": None, "at_end": False}, "would never evaluate"),
    ],
)
def test_callback_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMEvalHarness(**{"tasks": ["gsm8k"], **kwargs})


def test_the_built_in_evaluations_leaderboard_option_asks_lm_evals_exact_prompt(task_dir):
    import pandas as pd

    from lightning_parablock.eval import GSM8KEvaluation

    output = run_lm_eval(ScriptedAnswers({}, "#### 1"), ["gsm8k"], task_dir, ["gsm8k"], 3, 3, log_samples=True)
    train = pd.read_parquet(GSM8K_FILES["train"]).to_dict("records")
    for record in output["samples"]["gsm8k"]:
        prompt = record["arguments"][0][0]
        shots = [row for row in train if row["question"] in prompt]
        shots.sort(key=lambda row: prompt.index(row["question"]))
        assert len(shots) == 3
        evaluation = GSM8KEvaluation(
            ["q"], ["1"], prompt_format="question_answer", fewshot=[(row["question"], row["answer"]) for row in shots]
        )
        ask, stop = evaluation.prompt_and_stop(build_char_tokenizer())
        assert ask(record["doc"]["question"]) == prompt
        assert stop == ["Question:"]  # lm-eval's other stops, "</s>" and "<|im_end|>", are eos tokens here
