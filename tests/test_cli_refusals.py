"""`parablock fit` refuses bad input before training: one line naming the value (exit status 2, no traceback, no
jsonargparse Union noise), and nothing created or deleted. Each test is a real run of `lightning_parablock.cli.command.main`."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe_args
from lightning import LightningDataModule, LightningModule
from toy import ToyModule, toy_dataset, toy_loader, toy_loss

from lightning_parablock import CausalLMModule
from lightning_parablock.cli.command import ParaBlockCLI, concise_parse_error, main
from lightning_parablock.cli.output_folder import MARKER
from lightning_parablock.data import build_char_tokenizer

ROOT = Path(__file__).parents[1]
PAPER_RECIPE = str(ROOT / "recipes" / "paper" / "alpaca_llama3_8b.yaml")
LOCAL_TINY = str(ROOT / "recipes" / "local_tiny.yaml")
SLOW = pytest.mark.slow  # each CLI run builds a model and data (1-5 s on a busy 2-core machine): one per class stays fast


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", *tiny_recipe_args(tmp_path, *extra, output_dir=tmp_path / "model")]


def refused(capsys, args: list[str]) -> str:
    """Run the CLI, expect exit status 2, return stderr (checked to hold no traceback nor Union noise)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Union subtypes" not in err, err
    return err[err.index("parablock: error:") :]


def assert_nothing_created(tmp_path: Path, before: dict[str, bytes]) -> None:
    assert snapshot(tmp_path) == before  # no run folder, no model, nothing changed or deleted


# --- construction and parse errors: the library's sentence, first ------------------------------------------------

CONSTRUCTION = [
    (["--trainer.strategy.init_args.num_clients", "0"], r"FederatedBlockStrategy: `num_clients` must be a positive integer, got 0"),
    (["--trainer.callbacks.init_args.link.init_args.bandwidth", "0"], r"SimulatedLink: `bandwidth` must be positive, got 0"),
    pytest.param(*(["--trainer.callbacks.init_args.link.init_args.latency", "nan"], r"SimulatedLink: `latency`: Could not parse duration 'nan'"), marks=SLOW),
    pytest.param(*(["--trainer.callbacks.init_args.aggregator", '{"class_path": "lightning_parablock.Aggregator", "init_args": {"trim_fraction": 0.7}}'],
     r"Aggregator: `trim_fraction` must be in \[0, 0.5\), got 0.7"), marks=SLOW),
    pytest.param(*(["--model.init_args.config", '{"vocab_size": 8}'], r"CausalLMModule: `config` must name a `model_type`"), marks=SLOW),
    pytest.param(*(["--data.init_args.alpha", "inf"], r"`data.init_args.alpha`: Expected a <class 'float'>. Got value: inf"), marks=SLOW),
    (["--data.init_args.num_examples", "2.5"], r"`data.init_args.num_examples`: Expected a <class 'int'>. Got value: 2.5"),
    pytest.param(*(["--trainer.strategy.init_args.num_clientz", "3"], r"`trainer.strategy`: Option 'num_clientz' is not accepted"), marks=SLOW),
    (["--trainer.fast_dev_run", "true"], r"`--trainer.fast_dev_run=True` runs a single batch"),
    pytest.param(*(["--trainer.accumulate_grad_batches", "0"], r"`--trainer.accumulate_grad_batches=0` would train nothing"), marks=SLOW),
    (["--optimizer", "torch.optim.Adam"], r"`--optimizer` is not an option .*--trainer.strategy.init_args.client_optimizer"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), CONSTRUCTION)
def test_bad_values_are_refused_in_one_line_before_anything_is_created(tmp_path, capsys, extra, message):
    before = snapshot(tmp_path)
    err = refused(capsys, tiny_args(tmp_path, *extra))
    assert re.search(message, err.splitlines()[0]), err
    assert_nothing_created(tmp_path, before)


def test_a_number_for_the_bandwidth_on_the_command_line_is_bytes_per_second_as_in_yaml(tmp_path):
    args = tiny_args(tmp_path, "--trainer.callbacks.init_args.link.init_args.bandwidth", "1e8")[1:]
    cli = ParaBlockCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=args)  # fmt: skip
    link = cli.trainer.callbacks[0].link
    assert link.bytes_per_second == 1e8


def test_help_lists_report_and_report_spells_options_as_fit_does(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "report" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert "--output_dir" in out and "--rounds" in out and "--run " in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [([], "the following arguments are required: run_dir"), (["RUN", "--bogus"], "unrecognized arguments: --bogus"),
     (["RUN", "--rounds", "late"], "--rounds 'late'")],
)  # fmt: skip
def test_report_refuses_a_bad_argument_in_one_line_as_fit_does(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", *arguments])
    assert exit_info.value.code == 2
    error, hint = capsys.readouterr().err.splitlines()  # no usage text before the error
    assert error.startswith("parablock: error: ") and message in error, error
    assert hint == "(`parablock report --help` lists the options.)"


def test_parse_errors_keep_the_option_and_drop_the_other_subtypes():
    noise = (
        'Parser key "data":\n  Does not validate against any of the Union subtypes\n  Subtypes: [...]\n  Errors:\n'
        "    - Problem with given class_path 'x.Y':\n        Parser key \"batch_size\":\n"
        "          Expected a <class 'int'>. Got value: two\n    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'str'>"
    )
    assert concise_parse_error(noise) == "`data.init_args.batch_size`: Expected a <class 'int'>. Got value: two"
    assert concise_parse_error("Unrecognized arguments: --x") == "Unrecognized arguments: --x"


# --- the output folder: nothing the user owns is lost ------------------------------------------------------------


def test_a_users_non_empty_folder_is_refused_and_left_untouched(tmp_path, capsys):
    own = tmp_path / "model"
    own.mkdir()
    (own / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    err = refused(capsys, tiny_args(tmp_path))
    assert str(own) in err and "--overwrite_output true" in err
    assert_nothing_created(tmp_path, before)


@pytest.mark.parametrize("where", ["run", *(pytest.param(w, marks=SLOW) for w in ("run/logs", ".", "a_file", "a_file/model"))])
def test_an_output_dir_that_would_replace_the_run_or_cannot_be_written_is_refused(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    args = tiny_args(tmp_path)
    args[args.index("--output_dir") + 1] = where
    err = refused(capsys, args)
    assert f"--output_dir={where!r}" in err or repr(where) in err, err
    assert_nothing_created(tmp_path, before)


# --- data problems name the file and the row, before any run folder exists -------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_char_tokenizer().save_pretrained(folder)
    return folder


def local_args(tmp_path, tokenizer_dir, data_file, *extra):
    return [
        "fit", "--config", PAPER_RECIPE, "--config", LOCAL_TINY,
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.init_args.tokenizer", str(tokenizer_dir),
        "--data.init_args.cache_dir", str(tmp_path.parent / f"{tmp_path.name}_cache"),
        "--data.init_args.dataset.data_files", str(data_file),
        "--data.init_args.eval_dataset", "null",
        *extra,
    ]  # fmt: skip


GOOD_ROWS = "".join(json.dumps({"instruction": f"What is {i} + 1?", "output": str(i + 1)}) + "\n" for i in range(40))
DATA_PROBLEMS = [
    pytest.param(*("empty", "", [], r"Data file '.*empty.jsonl' is empty"), marks=SLOW),
    ("truncated", GOOD_ROWS + '{"instruction": "What is 2', [], r"Data file '.*truncated.jsonl', line 41: not valid JSON"),
    ("typed", GOOD_ROWS + '{"instruction": ["What is", "2 + 1?"], "output": 3}', [], r"Data file '.*typed.jsonl', line 41: column 'instruction' holds list"),
    pytest.param(*("tokenizer", GOOD_ROWS, ["--data.init_args.tokenizer", "/nonexistent/tokenizer"], r"`tokenizer='/nonexistent/tokenizer'` does not exist"), marks=SLOW),
    pytest.param(*("vocabulary", GOOD_ROWS, ["--model.init_args.config.vocab_size", "64"], r"vocab_size=64\) is smaller than the tokenizer's 105 tokens"), marks=SLOW),
    pytest.param(*("split", GOOD_ROWS, ["--data.init_args.val_split", "validation", "--data.init_args.val_fraction", "0"], r'split.jsonl \[validation\]: Unknown split "validation"'), marks=SLOW),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "extra", "message"), DATA_PROBLEMS)
def test_data_problems_name_the_file_and_row_before_a_run_folder_exists(tmp_path, capsys, tokenizer_dir, name, text, extra, message):
    data_file = tmp_path / f"{name}.jsonl"
    data_file.write_text(text)
    before = snapshot(tmp_path)
    err = refused(capsys, local_args(tmp_path, tokenizer_dir, data_file, *extra))
    assert re.search(message, err), err
    assert_nothing_created(tmp_path, before)


LATIN1 = {
    ".jsonl": GOOD_ROWS.encode() + '{"instruction": "Caf\u00e9 + 1?", "output": "2"}\n'.encode("latin-1"),
    ".csv": "instruction,output\n".encode() + "".join(f"Caf\u00e9 {i} + 1?,{i + 1}\n" for i in range(40)).encode("latin-1"),
}
"""The same rows saved as latin-1, as a spreadsheet or an old script may write them: 'é' is the byte 0xe9."""


@pytest.mark.parametrize("suffix", list(LATIN1))
def test_a_data_file_that_is_not_utf8_is_refused_naming_it_before_a_run_folder_exists(tmp_path, capsys, tokenizer_dir, suffix):
    data_file = tmp_path / f"latin1{suffix}"
    data_file.write_bytes(LATIN1[suffix])
    before = snapshot(tmp_path)
    err = refused(capsys, local_args(tmp_path, tokenizer_dir, data_file, "--data.init_args.dataset.path", suffix[1:]))
    assert re.match(rf"parablock: error: Data file '{re.escape(str(data_file))}', line \d+, .*: not UTF-8", err), err
    assert "Save the file as UTF-8" in err.splitlines()[0]
    assert_nothing_created(tmp_path, before)


# --- resume: the config stands; a checkpoint of another model is refused ------------------------------------------


def test_resuming_from_a_checkpoint_of_another_model_names_both_shapes(tmp_path, capsys):
    other = CausalLMModule(config={"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2})  # fmt: skip
    other.configure_model()
    checkpoint = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams)}, checkpoint)
    before = snapshot(tmp_path)
    err = refused(capsys, tiny_args(tmp_path, "--ckpt_path", str(checkpoint)))
    assert "model.model.embed_tokens.weight: (128, 32) in the checkpoint, (128, 64) in the config" in err, err
    assert "hidden_size=32 vs 64" in err
    assert_nothing_created(tmp_path, before)


@SLOW
def test_a_previous_output_of_parablock_is_recognised_by_its_marker(tmp_path, capsys):
    previous = tmp_path / "model"
    previous.mkdir()
    (previous / MARKER).write_text(json.dumps({"written_by": "lightning_parablock", "run": "r1"}))
    (previous / "config.json").write_text("{}")
    # accepted up to training: the refusal below comes from later in the checks, not from the output folder
    err = refused(capsys, tiny_args(tmp_path, "--trainer.accumulate_grad_batches", "0"))
    assert "accumulate_grad_batches" in err


def held_out(out: str) -> tuple[float, float]:
    before, after = re.search(r"held-out loss: ([0-9.]+) before -> ([0-9.]+) after", out).groups()
    return float(before), float(after)


@SLOW
def test_on_resume_the_summary_reports_the_resumed_models_loss_as_before(tmp_path, capsys):
    short = ["--trainer.check_val_every_n_epoch", "1", "--trainer.strategy.init_args.local_steps", "1",
             "--trainer.strategy.init_args.num_clients", "2", "--output_dir", "null"]  # fmt: skip
    checkpoint = ["--trainer.enable_checkpointing", "true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"), "--trainer.callbacks.every_n_epochs", "1",
                  "--trainer.callbacks.save_last", "true", "--trainer.callbacks.save_top_k", "0"]  # fmt: skip
    main(tiny_args(tmp_path, *short, "--trainer.max_epochs", "3", *checkpoint))
    fresh, trained = held_out(capsys.readouterr().out)
    main(tiny_args(tmp_path, *short, "--trainer.max_epochs", "4", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")))
    resumed_before, _ = held_out(capsys.readouterr().out)
    assert resumed_before < fresh - 0.1  # the checkpoint's model, not a fresh initialization
    assert resumed_before == pytest.approx(trained, abs=0.05)


class ToyWithValLoss(ToyModule):
    """A user's module: no `save_pretrained`, validation loss logged as `val_loss`."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", toy_loss(self, batch))


class ToyData(LightningDataModule):
    def train_dataloader(self):
        return toy_loader(toy_dataset())

    def val_dataloader(self):
        return toy_loader(toy_dataset(n=16, seed=2))


def test_a_users_own_module_gets_its_state_dict_saved_and_its_val_loss_reported(tmp_path, capsys):
    main(toy_cli_args(tmp_path))
    out = capsys.readouterr().out
    assert re.search(r"held-out loss: [0-9.]+ before -> [0-9.]+ after", out)  # found under `val_loss`
    assert "state dict of ToyWithValLoss" in out
    state = torch.load(tmp_path / "model" / "model_state_dict.pt", weights_only=True)
    assert "net.head.weight" in state


def test_a_setup_error_inside_fit_is_one_line_and_the_half_made_run_folder_is_removed(tmp_path, capsys):
    before = snapshot(tmp_path)
    err = refused(capsys, tiny_args(tmp_path, "--trainer.callbacks.init_args.staleness", "5"))
    assert "`staleness=5` is not below the number of rounds (max_epochs=2)" in err.splitlines()[0]
    assert_nothing_created(tmp_path, before)  # logs/version_0 with config.yaml and metrics.csv removed again


@pytest.mark.parametrize("content", [b"", b"\x80\x02not a checkpoint" * 50], ids=["empty", "random"])
def test_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path, capsys, content):
    checkpoint = tmp_path / "broken.ckpt"
    checkpoint.write_bytes(content)
    before = snapshot(tmp_path)
    err = refused(capsys, tiny_args(tmp_path, "--ckpt_path", str(checkpoint)))
    assert err.splitlines()[0].startswith(f"parablock: error: The checkpoint {checkpoint} cannot be read: "), err
    assert_nothing_created(tmp_path, before)


@pytest.mark.parametrize("given", ["model.safetensors", "pytorch_model.bin", "folder", "other_dict"])
def test_a_model_file_or_folder_as_ckpt_path_says_how_to_fine_tune_from_it(tmp_path, capsys, given):
    from pretrained import save_tiny_checkpoint
    from safetensors.torch import load_file

    model = save_tiny_checkpoint(tmp_path / "model_folder", torch.float32)
    weights = load_file(model / "model.safetensors")
    paths = {"model.safetensors": model / "model.safetensors", "pytorch_model.bin": tmp_path / "pytorch_model.bin",
             "folder": model, "other_dict": tmp_path / "other.pt"}  # fmt: skip
    torch.save(weights, paths["pytorch_model.bin"])
    torch.save({"weights": weights, "step": 3}, paths["other_dict"])
    before = snapshot(tmp_path)
    err = refused(capsys, tiny_args(tmp_path, "--ckpt_path", str(paths[given])))
    line = err.splitlines()[0]
    assert len(err.strip().splitlines()) == 1 and f"The checkpoint {paths[given]} " in line, err
    assert "not a Lightning checkpoint" in line or "is a folder with a model's config.json, not a file" in line, line
    assert "--model.init_args.model_name_or_path" in line and "holds a different model" not in line
    assert_nothing_created(tmp_path, before)


@SLOW
def test_a_checkpoint_without_federation_state_is_refused_before_training(tmp_path, capsys):
    built = ParaBlockCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         auto_configure_optimizers=False, run=False, args=tiny_args(tmp_path)[1:])  # fmt: skip
    checkpoint = tmp_path / "plain.ckpt"
    built.model.configure_model()  # the module builds its model lazily
    torch.save({"state_dict": built.model.state_dict(), "epoch": 0, "global_step": 4}, checkpoint)
    before = snapshot(tmp_path)
    err = refused(capsys, tiny_args(tmp_path, "--ckpt_path", str(checkpoint)))
    assert err.splitlines()[0].startswith(f"parablock: error: The checkpoint {checkpoint} holds no federation state"), err
    assert_nothing_created(tmp_path, before)


def test_only_the_first_process_of_a_machine_removes_the_refused_runs_new_folders(tmp_path):
    from types import SimpleNamespace

    from lightning_parablock.cli.command import _remove_new_folders

    new = [tmp_path / "run", tmp_path / "run" / "checkpoints"]
    new[1].mkdir(parents=True)
    _remove_new_folders(new, SimpleNamespace(local_rank=1, loggers=[]))
    assert new[1].is_dir()  # the other processes leave them to the first
    _remove_new_folders([*new, tmp_path / "already_removed_by_a_peer"], SimpleNamespace(local_rank=0, loggers=[]))
    assert not new[0].exists()


def toy_cli_args(tmp_path: Path) -> list[str]:
    return [
        "fit",
        "--model", f"{__name__}.ToyWithValLoss", "--data", f"{__name__}.ToyData",
        "--trainer.strategy", "lightning_parablock.FederatedBlockStrategy",
        "--trainer.strategy.init_args.num_clients", "2", "--trainer.strategy.init_args.local_steps", "1",
        "--trainer.callbacks", "lightning_parablock.ParaBlockCallback",
        "--trainer.max_epochs", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "model"),
    ]  # fmt: skip


def test_an_output_dir_that_cannot_be_written_at_the_end_exits_3_naming_where_the_model_is(tmp_path, capsys, monkeypatch):
    from lightning_parablock.cli import output_folder

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "model"))

    monkeypatch.setattr(output_folder, "_move_in_place", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        main(toy_cli_args(tmp_path))
    assert exit_info.value.code == 3  # `parablock fit ... && upload` stops: the model is not where it was asked
    last = capsys.readouterr().err.strip().splitlines()[-1]
    kept = tmp_path / "run" / next(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("parablock_final_model"))
    assert last.startswith(f"parablock: error: the model is not in --output_dir '{tmp_path / 'model'}': could not write"), last
    assert f"kept the model in '{kept}'" in last and "No space left on device" in last
    assert (kept / "model_state_dict.pt").is_file() and not (tmp_path / "model").exists()


def test_a_disk_that_fills_up_mid_run_ends_in_one_line_naming_the_intact_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    from lightning.fabric.plugins import TorchCheckpointIO

    real_save, calls = TorchCheckpointIO.save_checkpoint, []

    def fills_up(self, checkpoint, path, storage_options=None):
        calls.append(path)
        if len(calls) == 3:  # round 1's file: cut short as a full disk cuts it
            Path(path).write_bytes(b"PK\x03\x04" + b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", fills_up)
    checkpoints = tmp_path / "ckpt"
    args = [*toy_cli_args(tmp_path), "--trainer.max_epochs", "3", "--trainer.enable_checkpointing", "true",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath", str(checkpoints),
            "--trainer.callbacks.every_n_epochs", "1", "--trainer.callbacks.save_last", "true",
            "--trainer.callbacks.save_top_k", "-1"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"parablock: error: no space left on device writing '{calls[2]}' in round 1"), last
    assert f"Removed the incomplete checkpoint(s) ['{calls[2]}']" in last
    assert f"The last good checkpoint, '{checkpoints / 'last.ckpt'}', is intact" in last
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    torch.load(checkpoints / "last.ckpt", weights_only=True)["federation"]  # whole, and resumable
