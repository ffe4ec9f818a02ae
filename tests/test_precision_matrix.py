"""The precision matrix: checkpoint dtype × Trainer precision -> the dtype of the weights, the active block's
masters, the optimizer state, the deltas, what crosses the link and the saved model (README's table).

Tiny Llama checkpoints saved by the test in fp32 and bf16, loaded through ``CausalLMModule(dtype="auto")``.
"""

import pytest
import torch
from helpers import quiet_trainer
from lightning import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from pretrained import save_tiny_checkpoint
from transformers import AutoModelForCausalLM

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.data import SyntheticArithmeticDataModule
from lightning_parablock.module import CausalLMModule, load_dtype

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
MATRIX = {  # precision -> (weights, masters, optimizer state, deltas, link, saved); the same for both checkpoints
    "32-true": (F32, None, F32, F32, F32, F32),
    "bf16-mixed": (F32, None, F32, F32, F32, F32),
    "16-mixed": (F32, None, F32, F32, F32, F32),
    "bf16-true": (BF16, F32, F32, F32, F32, BF16),
    "16-true": (F16, F32, F32, F32, F32, F16),
}


def precision_args(precision: str, accelerator: str) -> dict:
    """Trainer arguments for ``precision``. ``precision="16-mixed"`` on CPU is turned into bf16 autocast by
    Lightning, so there the fp16 cell passes its plugin itself: CPU fp16 autocast and a CPU ``GradScaler``, the
    same ``MixedPrecision`` plugin (scaled loss, unscale, skipped steps on inf) that CUDA runs."""
    if precision != "16-mixed" or accelerator == "cuda":
        return {"precision": precision, "accelerator": accelerator}
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))], "accelerator": "cpu"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {dtype: save_tiny_checkpoint(root / str(dtype), dtype) for dtype in (F32, BF16)}


class Observe(Callback):
    """Dtypes seen during the active block's turn and what the comm thread is handed to send."""

    def __init__(self):
        self.weights, self.masters, self.state, self.logits = set(), set(), set(), set()

    def on_train_start(self, trainer, pl_module):
        pl_module.model.register_forward_hook(lambda model, args, output: self.logits.add(output.logits.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        strategy = trainer.strategy
        self.weights |= {p.dtype for p in pl_module.parameters()}
        master = strategy.federation._turn.master
        self.masters |= {m.dtype for m in master.masters.values()} if master is not None else set()
        for state in trainer.optimizers[0].state.values():
            self.state |= {state["exp_avg"].dtype, state["exp_avg_sq"].dtype}


ACCELERATORS = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("checkpoint_dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("precision", list(MATRIX))
def test_every_cell_of_the_precision_matrix(checkpoints, checkpoint_dtype, precision, accelerator, tmp_path):
    weights, masters, state, deltas, link, saved = MATRIX[precision]
    module = CausalLMModule(model_name_or_path=str(checkpoints[checkpoint_dtype]), learning_rate=1e-2)
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=2, schedule="sequential")
    sent, pending = [], []
    build = strategy.make_client_exchange

    def new_exchange(*args, **kwargs):
        exchange = build(*args, **kwargs)
        uploads = exchange.uploads

        def record_uploads(round_index):
            encoded = uploads(round_index)
            sent.extend(t.dtype for delta in encoded.deltas.values() for e in delta.values() for t in e.payload.values())
            pending.extend(
                t.dtype
                for c in strategy.federation.clients.values()
                for d in c.pending.values()
                for t in d.wait().tensors.values()
            )
            return encoded

        exchange.uploads = record_uploads
        return exchange

    strategy.make_client_exchange = new_exchange
    observe = Observe()
    trainer = quiet_trainer(
        strategy=strategy, callbacks=[observe, ParaBlockCallback(staleness=1)], max_epochs=3,
        **precision_args(precision, accelerator),
    )  # fmt: skip
    scaler, scaled = getattr(trainer.precision_plugin, "scaler", None), []
    if scaler is not None:
        scale = scaler.scale
        scaler.scale = lambda loss: scaled.append(loss) or scale(loss)
    data = SyntheticArithmeticDataModule(num_examples=32, val_examples=0, batch_size=4, max_length=48)
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    assert observe.weights == {weights}
    assert observe.masters == ({masters} if masters else set())
    assert observe.state == {state}
    assert pending and set(pending) == {deltas}
    assert sent and set(sent) == {link}
    if precision == "16-mixed":  # the fp16 path ran: fp16 autocast forward, the loss scaled by the GradScaler
        assert str(trainer.precision) == precision and observe.logits == {F16} and scaled
    module.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {saved}


@pytest.mark.parametrize("precision", list(MATRIX))
def test_auto_dtype_loads_what_the_precision_trains(precision):
    assert load_dtype("auto", precision) == MATRIX[precision][0]
    assert load_dtype("auto", None) == "auto"  # outside a Trainer: the checkpoint's own
    assert load_dtype("bfloat16", precision) == BF16


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_bf16_weights_under_an_fp32_precision_are_refused_by_name(checkpoints, precision):
    module = CausalLMModule(model_name_or_path=str(checkpoints[BF16]), dtype="bfloat16")
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1)
    trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback()], max_epochs=2, precision=precision)
    data = SyntheticArithmeticDataModule(num_examples=8, val_examples=0, batch_size=4)
    message = rf"`precision='{precision}'` trains float32 weights, but \d+ trainable parameter\(s\) are bfloat16"
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(module, train_dataloaders=data.train_dataloader())


def test_model_loads_in_the_trainers_dtype_inside_configure_model(checkpoints):
    module = CausalLMModule(model_name_or_path=str(checkpoints[BF16]))
    assert "model" not in module._modules  # nothing loaded before the Trainer asks
    trainer = quiet_trainer(max_epochs=1, precision="bf16-mixed", limit_train_batches=1)
    data = SyntheticArithmeticDataModule(num_examples=8, val_examples=0, batch_size=4)
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    assert {p.dtype for p in module.parameters()} == {F32}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_model_built_outside_the_trainer_is_refused_naming_that_cause_and_its_fixes(checkpoints, precision):
    """The notebook case: ``module.model`` read first takes the checkpoint's bf16; the fit must not say
    "use dtype='auto'" to a module that has it, but where the model was built and how to build it right."""
    module = CausalLMModule(model_name_or_path=str(checkpoints[BF16]))  # dtype="auto"
    assert module.model.dtype == BF16  # built outside a Trainer: the checkpoint's own dtype
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=1)
    trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback()], max_epochs=2, precision=precision)
    data = SyntheticArithmeticDataModule(num_examples=8, val_examples=0, batch_size=4)
    with pytest.raises(MisconfigurationException) as refused:
        trainer.fit(module, train_dataloaders=data.train_dataloader())
    message = str(refused.value)
    assert "was built outside a Trainer" in message and "in the checkpoint's own dtype bfloat16" in message
    assert f"`precision='{precision}'` trains float32 weights" in message
    assert "Build it after `Trainer(...)`" in message and "dtype='float32'" in message
    assert "dtype='auto'" not in message
    built_by_fit = CausalLMModule(model_name_or_path=str(checkpoints[BF16]))
    float32 = CausalLMModule(model_name_or_path=str(checkpoints[BF16]), dtype="float32")
    float32.configure_model()  # built early, but in the dtype asked for
    for fixed in (built_by_fit, float32):
        trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
                                callbacks=[ParaBlockCallback()], max_epochs=2, precision=precision)  # fmt: skip
        trainer.fit(fixed, train_dataloaders=data.train_dataloader())
        assert {p.dtype for p in fixed.parameters()} == {F32}


def test_a_model_built_for_another_trainers_precision_is_refused_naming_it(checkpoints):
    module = CausalLMModule(model_name_or_path=str(checkpoints[F32]))
    data = SyntheticArithmeticDataModule(num_examples=8, val_examples=0, batch_size=4)
    quiet_trainer(precision="bf16-true").validate(module, data.train_dataloader())  # builds it in bf16
    trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
                            callbacks=[ParaBlockCallback()], max_epochs=2, precision="32-true")  # fmt: skip
    with pytest.raises(MisconfigurationException, match=r"built for another Trainer's `precision='bf16-true'`, in bfloat16"):
        trainer.fit(module, train_dataloaders=data.train_dataloader())
