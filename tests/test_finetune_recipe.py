"""The "fine-tune a pretrained model" recipe, run on a tiny local chat checkpoint through its override file: the
output keeps the trained precision, the tokenizer and its chat template, loads with ``from_pretrained`` and
generates; ``--push_to_hub`` uploads that folder (the Hub call is recorded, nothing leaves the machine)."""

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from pretrained import save_tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_parablock.cli import main

RECIPES = Path(__file__).parents[1] / "recipes"


def chat_file(path: Path, rows: int = 40) -> str:
    topics = ["cooking pasta", "orbital rockets"]
    lines = []
    for i in range(rows):
        messages = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"About {topics[i % 2]}, tip {i}?"},
            {"role": "assistant", "content": f"Tip {i}."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": f"Tip {i + 1}."},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def recipe_args(tmp_path: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(RECIPES / "llama32_1b_chat.yaml"), "--config", str(RECIPES / "local_chat_tiny.yaml"),
        "--model.init_args.model_name_or_path", str(checkpoint), "--data.init_args.tokenizer", str(checkpoint),
        "--data.init_args.dataset.data_files", chat_file(tmp_path / "chat.jsonl"),
        "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "runs"),
        *extra,
    ]  # fmt: skip


class RecordedHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/0"})()


@pytest.mark.slow
def test_the_chat_recipe_fine_tunes_a_local_checkpoint_saves_it_whole_and_pushes_it(tmp_path, monkeypatch, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny_chat", torch.float32)
    hub = RecordedHub()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *args, **kw: hub.create_repo(*args, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(**kw))
    output = tmp_path / "final_model"
    main(recipe_args(tmp_path, checkpoint, "--output_dir", str(output), "--push_to_hub", "me/tiny-chat"))
    out = capsys.readouterr().out
    assert "pushed to the Hub: https://huggingface.co/me/tiny-chat/commit/0" in out
    assert [call[0] for call in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert hub.calls[1][2]["folder_path"] == str(output) and hub.calls[1][2]["repo_type"] == "model"

    model = AutoModelForCausalLM.from_pretrained(output, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the CPU override trains 32-true
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(checkpoint).chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)  # fmt: skip
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--push_to_hub", "not a repo"], r"`--push_to_hub='not a repo'` is not a Hub repository id"),
        (["--push_to_hub", "me/tiny-chat"], r"give `--output_dir` as well"),
    ],
)
def test_a_bad_push_to_hub_is_refused_before_training(tmp_path, capsys, extra, message):
    import re

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny_chat", torch.float32)
    with pytest.raises(SystemExit) as exit_info:
        main(recipe_args(tmp_path, checkpoint, "--output_dir", "null", *extra))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_a_failed_push_ends_in_one_line_naming_where_the_model_is(tmp_path, monkeypatch, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny_chat", torch.float32)

    def offline(api, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    output = tmp_path / "final_model"
    with pytest.raises(SystemExit) as exit_info:
        main(recipe_args(tmp_path, checkpoint, "--output_dir", str(output), "--push_to_hub", "me/tiny-chat"))
    assert exit_info.value.code == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("parablock: error: the upload to the Hub repository 'me/tiny-chat' failed")
    assert f"the model is saved in {output}" in err[-1]
    assert AutoModelForCausalLM.from_pretrained(output) is not None  # kept where it was written


def test_a_module_attached_to_a_trainer_builds_in_the_dtype_its_precision_trains(tmp_path):
    """What ``parablock fit --ckpt_path`` relies on: its checks build the model before ``fit`` does."""
    from lightning import Trainer

    from lightning_parablock import CausalLMModule

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny_bf16", torch.bfloat16)
    alone = CausalLMModule(model_name_or_path=str(checkpoint))
    alone.configure_model()
    assert {p.dtype for p in alone.parameters()} == {torch.bfloat16}  # outside a Trainer: the checkpoint's own
    attached = CausalLMModule(model_name_or_path=str(checkpoint))
    attached.trainer = Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    attached.configure_model()
    assert {p.dtype for p in attached.parameters()} == {torch.float32}


@pytest.mark.parametrize(("start_method", "on_the_ranks_device"), [("popen", True), ("spawn", False)])
def test_the_checks_build_the_model_where_and_as_fit_builds_it(monkeypatch, start_method, on_the_ranks_device):
    """``parablock fit --ckpt_path`` builds the model for its checks under the strategy's and the precision's init
    contexts, as ``trainer.fit`` would: on the rank's device (no host copy per rank) and in the trained dtype. A
    parent that spawns the ranks is no rank: it builds on the host, in the trained dtype still."""
    from lightning import LightningModule, Trainer

    from lightning_parablock import FederatedBlockStrategy
    from lightning_parablock.cli.preflight import model_init_context

    class Built(LightningModule):
        def configure_model(self) -> None:
            self.layer = torch.nn.Linear(4, 4)

    strategy = FederatedBlockStrategy(num_clients=2, start_method=start_method)
    entered = []
    init_context = strategy.tensor_init_context
    monkeypatch.setattr(strategy, "tensor_init_context", lambda *a, **k: entered.append(True) or init_context(*a, **k))
    trainer = Trainer(
        accelerator="cpu", devices=2, precision="bf16-true", strategy=strategy, logger=False, enable_progress_bar=False
    )
    module = Built()
    with model_init_context(trainer):
        module.configure_model()
    assert entered == ([True] if on_the_ranks_device else [])
    assert {(p.dtype, p.device) for p in module.parameters()} == {(torch.bfloat16, strategy.root_device)}
