"""Greedy generation and the GSM8K callback inside a Trainer, with a tiny random Llama and the character tokenizer."""

import copy
import csv

import lightning as L
import pytest
import torch
from datasets import Dataset
from helpers import quiet_trainer
from lightning import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.data import SyntheticArithmeticDataModule, build_char_tokenizer, format_prompt
from lightning_parablock.eval import (
    GSM8KEvaluation,
    encode_prompt,
    extract_numeric_answer,
    generate_answers,
)
from lightning_parablock.module import CausalLMModule

QUESTIONS = ["What is 3 + 4?", "What is 12 - 5?", "What is 6 * 7?", "Which is larger, 8 or 3?", "What is 9 + 9?", "Hi"]
MAX_NEW_TOKENS = 8


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def model(tiny_llama_config):
    return CausalLMModule(config=tiny_llama_config, seed=0).model


def _datamodule() -> SyntheticArithmeticDataModule:
    return SyntheticArithmeticDataModule(num_examples=16, val_examples=4, batch_size=4, partition="iid", seed=0)


def _greedy_by_hand(model, tokenizer, prompt: str) -> str:
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    new = []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generation_returns_the_greedy_continuation_only(model, tokenizer):
    model.eval()
    answers = generate_answers(model, tokenizer, QUESTIONS, format_prompt, batch_size=4, max_new_tokens=MAX_NEW_TOKENS)
    assert answers == [_greedy_by_hand(model, tokenizer, format_prompt(q)) for q in QUESTIONS]


def test_generation_is_bounded_deterministic_and_independent_of_batching(model, tokenizer):
    model.train()
    first = generate_answers(model, tokenizer, QUESTIONS, format_prompt, batch_size=4, max_new_tokens=MAX_NEW_TOKENS)
    assert model.training  # evaluated in eval mode, handed back in the mode it was in
    assert all(len(tokenizer.encode(text, add_special_tokens=False)) <= MAX_NEW_TOKENS for text in first)
    assert generate_answers(model, tokenizer, QUESTIONS, format_prompt, 4, MAX_NEW_TOKENS) == first
    # Left padding: one prompt per batch (no padding) gives the same answers as padded batches.
    assert generate_answers(model, tokenizer, QUESTIONS, format_prompt, 1, MAX_NEW_TOKENS) == first


def test_generation_pads_with_eos_without_a_pad_token_and_needs_one_of_them(model, tokenizer):
    expected = generate_answers(model, tokenizer, QUESTIONS[:3], max_new_tokens=4)
    tokenizer.pad_token = None
    assert generate_answers(model, tokenizer, QUESTIONS[:3], max_new_tokens=4) == expected
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        generate_answers(model, tokenizer, QUESTIONS[:3], max_new_tokens=4)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"batch_size": 0}, "`batch_size`.*got 0"), ({"max_new_tokens": 0}, "got 0")]
)
def test_generation_refuses_bad_settings(model, tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_answers(model, tokenizer, QUESTIONS, **kwargs)


def _references_with_known_accuracy(outputs: list[str]) -> tuple[list, float]:
    """Right for every even-numbered output that holds a number, wrong for all others."""
    references, correct = [], 0
    for index, output in enumerate(outputs):
        value = extract_numeric_answer(output)
        if value is not None and index % 2 == 0:
            references.append(value)
            correct += 1
        else:
            references.append(0 if value is None else value + 1)
    return references, correct / len(outputs)


def test_callback_logs_accuracy_each_round_with_the_round_as_step(tiny_llama_config, tmp_path):
    module = CausalLMModule(config=tiny_llama_config, learning_rate=0.0, seed=0)  # weights never change
    datamodule = _datamodule()
    outputs = generate_answers(module.hf_model, datamodule.tokenizer, QUESTIONS, format_prompt, 4, MAX_NEW_TOKENS)
    references, accuracy = _references_with_known_accuracy(outputs)
    assert accuracy > 0, "the random model should write some numbers; pick other QUESTIONS"
    callback = GSM8KEvaluation(QUESTIONS, references, every_n_rounds=1, batch_size=4, max_new_tokens=MAX_NEW_TOKENS)
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)

    # Rounds 0 and 1 at their ends; the last round only at train end (the tokenizer came from the datamodule).
    assert [(r.round, r.final) for r in callback.results] == [(0, False), (1, False), (2, True)]
    assert all(r.accuracy == pytest.approx(accuracy) and r.count == len(QUESTIONS) for r in callback.results)
    assert callback.results[-1].generations == outputs
    assert trainer.callback_metrics["eval/gsm8k_accuracy"].item() == pytest.approx(accuracy)
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("eval/gsm8k_accuracy")]
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]  # the round
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps) and steps[-1] == trainer.global_step  # never backwards for any logger
    assert [float(row["eval/gsm8k_accuracy"]) for row in rows] == pytest.approx([accuracy] * 3)
    assert [float(row["eval/gsm8k_count"]) for row in rows] == [len(QUESTIONS)] * 3


def _parablock_fit(tiny_llama_config, extra_callbacks, first=()):
    module = CausalLMModule(config=tiny_llama_config, learning_rate=1e-2, seed=0)
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1, seed=0)
    trainer = quiet_trainer(
        strategy=strategy,
        callbacks=[*first, ParaBlockCallback(staleness=1), *extra_callbacks],
        max_epochs=3,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=_datamodule())
    return module


class _BeforeFlush(Callback):
    """Copies the model at train end before ParaBlockCallback flushes the last round (when listed before it)."""

    def on_train_end(self, trainer, pl_module):
        self.model = copy.deepcopy(pl_module.hf_model)


def test_callback_after_parablock_evaluates_the_final_global_model_and_leaves_training_alone(tiny_llama_config):
    before_flush = _BeforeFlush()
    callback = GSM8KEvaluation(QUESTIONS, [7, 7, 42, 8, 18, 0], every_n_rounds=2, max_new_tokens=MAX_NEW_TOKENS)
    module = _parablock_fit(tiny_llama_config, [callback], first=[before_flush])
    assert [(r.round, r.final) for r in callback.results] == [(1, False), (2, True)]
    tokenizer = build_char_tokenizer()
    final = generate_answers(module.hf_model, tokenizer, QUESTIONS, format_prompt, 8, MAX_NEW_TOKENS)
    unflushed = generate_answers(before_flush.model, tokenizer, QUESTIONS, format_prompt, 8, MAX_NEW_TOKENS)
    assert unflushed != final, "the flushed round should change some answer, or this test shows nothing"
    assert callback.results[-1].generations == final

    without_eval = _parablock_fit(tiny_llama_config, [])
    expected = without_eval.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in module.state_dict().items())


def test_callback_before_parablock_is_refused(tiny_llama_config):
    early = GSM8KEvaluation(QUESTIONS, [7, 7, 42, 8, 18, 0], every_n_rounds=1)
    module = CausalLMModule(config=tiny_llama_config, seed=0)
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
        callbacks=[early, ParaBlockCallback(staleness=1)],
        max_epochs=2,
    )
    with pytest.raises(MisconfigurationException, match="listed before ParaBlockCallback"):
        trainer.fit(module, datamodule=_datamodule())


def test_callback_needs_a_tokenizer_and_a_generating_model(tiny_llama_config):
    evaluation = GSM8KEvaluation(["What is 1 + 1?"], ["2"])
    with pytest.raises(MisconfigurationException, match="found no tokenizer"):
        quiet_trainer(callbacks=[evaluation], max_epochs=1).fit(
            CausalLMModule(config=tiny_llama_config), torch.utils.data.DataLoader(range(4))
        )
    evaluation = GSM8KEvaluation(["What is 1 + 1?"], ["2"], tokenizer=build_char_tokenizer())
    with pytest.raises(
        MisconfigurationException,
        match="needs a Hugging Face model with `generate` at `ToyModule.hf_model` or `.model`, got NoneType",
    ):
        quiet_trainer(callbacks=[evaluation], max_epochs=1).fit(ToyModule(), toy_loader(toy_dataset()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"answers": ["7", "odd"]}, r"Answer 1 \(for question 'b'\) is not numeric.*'odd'"),
        ({"answers": ["7"]}, "2 questions but 1 answers"),
        ({"prompt_format": "Q: {q}\nA:"}, r"`prompt_format` must be one of .*'question_answer'.*got 'Q: \{q\}\\nA:'"),
        ({"prompt_format": "alpaca"}, "'alpaca_lora'.*'stanford_alpaca'"),
        ({"prompt_format": 3}, "or a function from question to prompt, got 3"),
        ({"prompt_format": lambda q: q, "fewshot": [("1+1?", "2")]}, "`fewshot` needs a named `prompt_format`"),
        ({"fewshot": ["1+1? 2"]}, r"`fewshot` must be \(question, answer\) pairs"),
        ({"every_n_rounds": 0}, "`every_n_rounds` must be a positive integer or None, got 0"),
        ({"at_end": False}, "would never evaluate"),
    ],
)
def test_callback_refuses_bad_arguments(kwargs, match):
    arguments = {"questions": ["a", "b"], "answers": ["7", "8"], **kwargs}
    with pytest.raises(ValueError, match=match):
        GSM8KEvaluation(**arguments)


def test_callback_from_any_dataset_with_a_numeric_answer_column():
    table = Dataset.from_dict({"instruction": ["What is 2 + 2?", "What is 5 * 5?"], "output": ["4", "25"]})
    evaluation = GSM8KEvaluation.from_dataset(
        table, question_column="instruction", answer_column="output", prompt_format=lambda q: f"Q: {q}\nA:"
    )
    assert evaluation.questions == ["What is 2 + 2?", "What is 5 * 5?"]
    prompt, stop = evaluation.prompt_and_stop(build_char_tokenizer())
    assert (prompt("Why?"), stop) == ("Q: Why?\nA:", [])
    with pytest.raises(ValueError, match="no column 'answer'; its columns are"):
        GSM8KEvaluation.from_dataset(table, question_column="instruction")


def test_questions_come_from_the_datamodules_eval_examples_when_none_are_given(tiny_llama_config):
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_parablock.data import build_char_tokenizer

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config))
    examples = {"instruction": ["What is 2 + 3?", "What is 4 * 4?"], "output": ["2 + 3 = 5\n#### 5", "#### 16"]}
    datamodule = SimpleNamespace(eval_examples=examples, tokenizer=build_char_tokenizer())
    callback = GSM8KEvaluation(at_end=True)
    callback.on_fit_start(SimpleNamespace(datamodule=datamodule), SimpleNamespace(hf_model=model))
    assert callback.questions == examples["instruction"] and callback.answers == examples["output"]

    bad = SimpleNamespace(eval_examples={"instruction": ["Q"], "output": ["no number"]}, tokenizer=None)
    with pytest.raises(ValueError, match="Answer 0 .* is not numeric"):
        GSM8KEvaluation().on_fit_start(SimpleNamespace(datamodule=bad), SimpleNamespace(hf_model=model))
    with pytest.raises(MisconfigurationException, match="no `eval_examples`"):
        GSM8KEvaluation().on_fit_start(SimpleNamespace(datamodule=None), SimpleNamespace(hf_model=model))
    with pytest.raises(ValueError, match="both `questions` and `answers`, or neither"):
        GSM8KEvaluation(questions=["Q"])


def test_stop_strings_cut_the_answer_where_they_first_appear(model, tokenizer):
    free = generate_answers(model, tokenizer, QUESTIONS, format_prompt, 4, MAX_NEW_TOKENS)
    stop = next(text[2:4] for text in free if len(text) >= 4)  # occurs in some output, not at its start
    cut = generate_answers(model, tokenizer, QUESTIONS, format_prompt, 4, MAX_NEW_TOKENS, stop=[stop])
    assert cut == [text.split(stop)[0] for text in free]
    assert cut != free


def test_by_default_questions_are_asked_in_the_datamodules_prompt_format(tokenizer):
    from types import SimpleNamespace

    evaluation = GSM8KEvaluation(["What is 2 + 3?"], ["5"])
    datamodule = SimpleNamespace(hparams=SimpleNamespace(prompt_format="stanford_alpaca"))
    prompt, stop = evaluation.prompt_and_stop(tokenizer, datamodule)
    assert prompt("What is 2 + 3?") == format_prompt("What is 2 + 3?", prompt_format="stanford_alpaca")
    assert stop == ["### Instruction:"]
    prompt, _ = evaluation.prompt_and_stop(tokenizer, SimpleNamespace())  # no format to follow: auto
    assert prompt("What is 2 + 3?") == format_prompt("What is 2 + 3?", prompt_format="alpaca_lora")
    shots = GSM8KEvaluation(["q"], ["1"], prompt_format="question_answer", fewshot=[("1 + 1?", "#### 2")], stop=[])
    prompt, stop = shots.prompt_and_stop(tokenizer, datamodule)
    assert (prompt("2 + 2?"), stop) == ("Question: 1 + 1?\nAnswer: #### 2\n\nQuestion: 2 + 2?\nAnswer:", [])
