"""A resume is the run it continues, or it is refused before training in one line naming the setting, the
checkpoint's value and the new one; a checkpoint without federation state or a corrupt file is refused naming it,
and nothing the user owns changes."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.strategies.fedcybgd import FedCyBGDStrategy

STRATEGY = dict(num_clients=3, local_steps=1, clients_per_round=2, seed=0)
CALLBACK = dict(staleness=1, compression="topk")


def fit(folder: Path, ckpt_path=None, strategy_class=FederatedBlockStrategy, max_epochs=2, strategy=None, callback=None):
    module = ToyModule(optimizer="adamw")
    trainer = quiet_trainer(
        strategy=strategy_class(**{**STRATEGY, **(strategy or {})}),
        callbacks=[
            ParaBlockCallback(**{**CALLBACK, **(callback or {})}),
            ModelCheckpoint(dirpath=folder, save_last=True, every_n_epochs=1, save_top_k=-1),
        ],
        max_epochs=max_epochs,
        enable_checkpointing=True,
    )
    trainer.fit(module, toy_loader(toy_dataset()), ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
    return module, trainer


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A ParaBlock run with top-k compression stopped after round 1 (round 1's deltas and residuals pending)."""
    folder = tmp_path_factory.mktemp("saved_run")
    fit(folder / "checkpoints")
    return folder


def round_0(saved_run: Path) -> Path:
    """The checkpoint of round 0: round 0's deltas still pending with staleness 1."""
    (path,) = (saved_run / "checkpoints").glob("epoch=0-*.ckpt")
    return path


def refused(saved_run: Path, tmp_path: Path, **kwargs) -> str:
    before = snapshot(saved_run)
    with pytest.raises(MisconfigurationException) as error:
        fit(tmp_path / "resumed", ckpt_path=kwargs.pop("ckpt_path", round_0(saved_run)), max_epochs=4, **kwargs)
    assert snapshot(saved_run) == before  # nothing the user owns changed
    assert not (tmp_path / "resumed").exists()  # refused before anything was written
    message = str(error.value)
    assert "\n" not in message
    return message


CHANGED = [
    (dict(strategy=dict(seed=1)), "seed: 0 in the checkpoint, 1 now"),
    (dict(callback=dict(compression="none")), "compression: 'TopKCodec(fraction=0.1)' in the checkpoint, 'Codec()' now"),
    (dict(callback=dict(staleness=2)), "staleness: 1 in the checkpoint, 2 now"),
    (dict(strategy=dict(weighting="samples")), "weighting: 'uniform' in the checkpoint, 'samples' now"),
    (dict(strategy=dict(clients_per_round=3)), "clients_per_round: 2 in the checkpoint, 3 now"),
    (dict(strategy=dict(optimizer_state="per_block")), "optimizer_state: 'reset' in the checkpoint, 'per_block' now"),
    (dict(strategy=dict(global_lr=0.5)), "global_lr: 1.0 in the checkpoint, 0.5 now"),
    (dict(strategy=dict(schedule="sequential")), "schedule: 'random' in the checkpoint, 'sequential' now"),
    (dict(strategy=dict(local_steps=2)), "local_steps: 1 in the checkpoint, 2 now"),
    (dict(callback=dict(aggregator={"method": "median"})), "aggregator: \"MeanAggregator(weighting='uniform'"),
]


@pytest.mark.parametrize(("change", "message"), CHANGED, ids=[m.split(":")[0] for _, m in CHANGED])
def test_a_resume_with_another_setting_is_refused_naming_it(saved_run, tmp_path, change, message):
    if "aggregator" in change.get("callback", {}):
        from lightning_parablock import MedianAggregator

        change = dict(callback=dict(aggregator=MedianAggregator()))
    text = refused(saved_run, tmp_path, **change)
    assert message in text, text
    assert "A resume continues the run it was saved from" in text


def test_a_parablock_checkpoint_resumed_as_fedcybgd_is_refused(saved_run, tmp_path):
    text = refused(
        saved_run, tmp_path, strategy_class=FedCyBGDStrategy, strategy=dict(clients_per_round=None), callback=dict(staleness=0)
    )
    assert "method: 'parablock' in the checkpoint, 'fedcybgd' now" in text, text
    assert "strategy: 'FederatedBlockStrategy' in the checkpoint, 'FedCyBGDStrategy' now" in text


def test_more_rounds_and_offloaded_deltas_are_safe_changes_and_resume(saved_run, tmp_path):
    module, trainer = fit(tmp_path / "resumed", ckpt_path=round_0(saved_run), max_epochs=3, strategy=dict(offload_deltas=True))
    assert trainer.current_epoch == 3


def test_a_checkpoint_without_federation_state_is_refused_naming_what_is_missing(saved_run, tmp_path):
    plain = tmp_path / "plain.ckpt"
    checkpoint = torch.load(saved_run / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["federation"]
    torch.save(checkpoint, plain)
    text = refused(saved_run, tmp_path, ckpt_path=plain)
    assert f"The checkpoint {plain} holds no federation state" in text
    assert "would lose every client's pending deltas" in text and "fit without `ckpt_path`" in text


class Payload:
    """Unpickling this would run a command: touch a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def corrupt(kind: str, good: bytes, folder: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 16)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "payload":
        torch.save({"state_dict": {}, "hyper_parameters": Payload(folder / "payload_ran")}, path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"state_dict": Payload(folder / "payload_ran")}))
    return path


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        ("truncated", "the file ends before its contents do"),
        ("random", "it is not a torch checkpoint"),
        ("empty", "the file is empty (0 bytes)"),
        ("payload", "nothing in it was run (Trying to load unsupported GLOBAL posix.system"),
        ("plain_pickle", "it is not a torch checkpoint"),
    ],
)
def test_a_corrupt_checkpoint_is_refused_naming_the_file_and_its_payload_never_runs(saved_run, tmp_path, kind, what):
    path = corrupt(kind, (saved_run / "checkpoints" / "last.ckpt").read_bytes(), tmp_path)
    text = refused(saved_run, tmp_path, ckpt_path=path)
    assert text.startswith(f"The checkpoint {path} cannot be read: "), text
    assert what in text, text
    assert not (tmp_path / "payload_ran").exists()


def test_a_resume_under_another_precision_is_refused_naming_both(tmp_path):
    module = ToyModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_last=True)
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1)
    trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(staleness=1), checkpoint], max_epochs=2,
                            enable_checkpointing=True, precision="bf16-mixed")  # fmt: skip
    trainer.fit(module, toy_loader(toy_dataset()))
    resumed = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
                            callbacks=[ParaBlockCallback(staleness=1)], max_epochs=3, precision="32-true")  # fmt: skip
    with pytest.raises(MisconfigurationException, match="precision: 'bf16-mixed' in the checkpoint, '32-true' now"):
        resumed.fit(ToyModule(), toy_loader(toy_dataset()), ckpt_path=tmp_path / "last.ckpt")


@pytest.mark.parametrize("kind", ["safetensors", "state_dict", "folder"])
def test_a_models_weights_as_ckpt_path_are_not_a_lightning_checkpoint(saved_run, tmp_path, kind):
    from safetensors.torch import save_file

    weights = {name: value.clone() for name, value in ToyModule().state_dict().items()}
    names = {"safetensors": "model.safetensors", "state_dict": "weights.pt", "folder": "model"}
    path = tmp_path / names[kind]
    if kind == "safetensors":
        save_file(weights, path)
    elif kind == "state_dict":
        torch.save(weights, path)
    else:
        path.mkdir()
        (path / "config.json").write_text("{}")
    text = refused(saved_run, tmp_path, ckpt_path=path)
    assert text.startswith(f"The checkpoint {path} "), text
    assert ("not a Lightning checkpoint" if kind != "folder" else "is a folder with a model's config.json") in text
    assert "model_name_or_path" in text
