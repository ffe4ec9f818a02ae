"""Accuracy on your own chat data: ``parablock evaluate`` on a saved folder, and ``ChatEvaluation`` during training.

The answers of a tiny checkpoint the test saves are compared with what ``model.generate`` gives for each
conversation alone (the saved chat template, greedy, cut at the end of turn): batching, padding and the
template must not change them, and the scores count exactly the references that equal them.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from pretrained import save_tiny_checkpoint
from test_chat_data import write_jsonl
from test_finetune_recipe import chat_file, recipe_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.cli import main
from lightning_parablock.data import FederatedDataModule
from lightning_parablock.eval import AnswerMatch, ChatEvaluation, load_chat_examples, score_chat

MAX_NEW = 6
QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Say hi", "Why is the sky blue? Explain in detail please.", "Ok?"]


def alone(model, tokenizer, turns) -> str:
    """One conversation's greedy answer, generated alone without padding: the reference implementation."""
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def conversation(question: str, answer: str, history: bool) -> dict:
    turns = [{"role": "system", "content": "Be brief."}] if history else []
    if history:
        turns += [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    return {"messages": [*turns, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny checkpoint and a chat file whose references are the model's own answers on even rows only."""
    root = tmp_path_factory.mktemp("chat_eval")
    folder = save_tiny_checkpoint(root / "model", initializer_range=0.5)  # answers that differ by prompt
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    rows = []
    for index, question in enumerate(QUESTIONS):
        row = conversation(question, "?", history=index % 2 == 1)
        own = alone(model, tokenizer, row["messages"][:-1])
        row["messages"][-1]["content"] = f"  {own} " if index % 2 == 0 else own + " (wrong)"
        rows.append(row)
    data = root / "eval.jsonl"
    write_jsonl(data, rows)
    return folder, data, model, tokenizer


def test_batched_answers_are_each_conversations_own_and_exact_match_counts_them(saved):
    folder, data, model, tokenizer = saved
    examples = load_chat_examples(data)
    assert [len(e.prompt) for e in examples] == [1, 4, 1, 4, 1]  # everything before the last assistant turn
    score = score_chat(model, tokenizer, examples, AnswerMatch(), batch_size=2, max_new_tokens=MAX_NEW)
    answers = [row["answer"] for row in score.rows]
    assert answers == [alone(model, tokenizer, e.prompt) for e in examples] and len(set(answers)) == len(answers)
    assert [row["correct"] for row in score.rows] == [True, False, True, False, True]
    assert (score.correct, score.count) == (3, 5)


def test_a_pattern_scores_what_it_finds_in_answer_and_reference(saved):
    _, data, model, tokenizer = saved
    examples = load_chat_examples(data)
    first_word = AnswerMatch(r"^\s*(?P<answer>\S+)")  # the wrong rows only add words after the model's answer
    score = score_chat(model, tokenizer, examples, first_word, batch_size=3, max_new_tokens=MAX_NEW)
    assert score.correct == 5 and [row["extracted"] for row in score.rows] == [row["expected"] for row in score.rows]
    last_word = AnswerMatch(r"(\S+)\s*$")  # group 1: "(wrong)" on the odd rows
    assert score_chat(model, tokenizer, examples, last_word, max_new_tokens=MAX_NEW).correct == 3


def test_the_command_scores_a_saved_folder_and_writes_every_answer(saved, tmp_path, capsys):
    folder, data, model, tokenizer = saved
    output = tmp_path / "answers.jsonl"
    main(["evaluate", str(folder), "--data", str(data), "--max_new_tokens", str(MAX_NEW), "--batch_size", "4",
          "--output", str(output)])  # fmt: skip
    out = capsys.readouterr().out
    assert "accuracy: 3/5 = 60.0%" in out and "scored by exact match" in out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(5)) and [r["correct"] for r in rows] == [True, False, True, False, True]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--pattern", "("], r"`pattern` '\(' is not a regular expression"),
        (["--pattern", r"\d{9}"], r"eval\.jsonl, row 0: pattern '\\\\d\{9\}' finds nothing in the reference answer"),
        (["--batch_size", "0"], r"`--batch_size` must be a positive integer, got 0"),
        (["--output", "EXISTING"], r"exists; choose another file or pass --overwrite"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_loading_the_model(extra, expected, saved, tmp_path, capsys):
    folder, data, *_ = saved
    (tmp_path / "EXISTING").write_text("mine\n")
    extra = [str(tmp_path / "EXISTING") if e == "EXISTING" else e for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(folder), "--data", str(data), *extra])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("parablock: error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), errors
    assert (tmp_path / "EXISTING").read_text() == "mine\n"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (['{"text": "no chat"}'], r"row 0: no `messages` \(or `conversations`\) list of turns"),
        (['{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}'], r"row 0: a conversation needs an assistant turn answering a user turn"),
        (['{"messages": [{"role": "bot", "content": "x"}]}'], r"row 0, turn 0: unknown role 'bot'"),
        (["not json"], r"line 1: not a JSON object"),
    ],
)  # fmt: skip
def test_a_bad_chat_file_is_refused_naming_the_row(rows, expected, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=expected):
        load_chat_examples(path)


def test_a_model_folder_is_found_in_a_run_folder_and_an_adapter_folder_is_refused(saved, tmp_path, capsys):
    from lightning_parablock.cli.evaluate import find_model_folder

    folder, *_ = saved
    assert find_model_folder(folder) == folder
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a LoRA adapter alone; evaluate the merged model folder"):
        find_model_folder(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="holds no model"):
        find_model_folder(tmp_path)


def test_during_training_the_global_model_is_scored_every_round_and_at_the_end(saved, tmp_path):
    folder, data, *_ = saved
    train = Path(chat_file(tmp_path / "train.jsonl", rows=16))
    evaluation = ChatEvaluation(str(data), every_n_rounds=1, max_new_tokens=MAX_NEW, batch_size=4)
    module = CausalLMModule(model_name_or_path=str(folder), learning_rate=0.0)  # lr 0: the saved model's answers
    datamodule = FederatedDataModule(dataset={"path": "json", "data_files": str(train)}, tokenizer=str(folder),
                                     max_length=96, batch_size=2, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
                            callbacks=[ParaBlockCallback(), evaluation], max_epochs=2)  # fmt: skip
    trainer.fit(module, datamodule)
    assert [(r.correct, r.count) for r in evaluation.results] == [(3, 5), (3, 5)]  # round 0, then the final model
    assert trainer.callback_metrics["eval/chat_accuracy"] == pytest.approx(0.6)


def test_an_evaluation_file_is_checked_when_the_callback_is_made(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(conversation("q", "The answer is 4", history=False)) + "\n")
    with pytest.raises(ValueError, match="finds nothing in the reference answer 'The answer is 4'"):
        ChatEvaluation(str(path), pattern=r"#### (\d+)")


@pytest.mark.slow
def test_a_fine_tuned_run_is_evaluated_from_its_run_folder(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny_chat")
    main(recipe_args(tmp_path, checkpoint, "--output_dir", str(tmp_path / "runs" / "final_model")))
    capsys.readouterr()
    main(["evaluate", str(tmp_path / "runs"), "--data", str(tmp_path / "chat.jsonl"), "--limit", "4",
          "--max_new_tokens", "8", "--pattern", r"Tip (\d+)"])  # fmt: skip
    out = capsys.readouterr().out
    assert f"model: {tmp_path / 'runs' / 'final_model'} (float32 on cpu)" in out
    assert re.search(r"accuracy: \d/4 = \d+\.\d%", out)
