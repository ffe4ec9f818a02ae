"""Half precision on a CPU without instructions for it: warned about before training, naming what is missing and
the precision to use (it runs, several times slower than fp32; README, Troubleshooting)."""

import warnings
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from lightning import Callback
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.core import cpu_half
from lightning_parablock.core.cpu_half import cpu_flags, missing_half_instructions
from lightning_parablock.strategies.trainer_checks import EmulatedPrecisionWarning, check_trainer

AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n\n"
WITH_BF16 = AVX2_ONLY.replace("avx2", "avx2 avx512f avx512_bf16")
ARM_NO_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimdhp\n"


@pytest.fixture
def cpu(tmp_path, monkeypatch):
    """Makes the process read ``/proc/cpuinfo`` from a file the test writes."""

    def use(text: str) -> None:
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(cpu_half, "CPUINFO", tmp_path / "cpuinfo")

    return use


def test_the_flags_are_read_for_x86_and_arm(tmp_path):
    (tmp_path / "x86").write_text(AVX2_ONLY)
    (tmp_path / "arm").write_text(ARM_NO_BF16)
    assert {"avx2", "sse2"} <= cpu_flags(tmp_path / "x86") and "asimdhp" in cpu_flags(tmp_path / "arm")
    assert cpu_flags(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("text", "dtype", "missing"),
    [
        (AVX2_ONLY, torch.bfloat16, ("avx512_bf16", "amx_bf16")),
        (WITH_BF16, torch.bfloat16, None),
        (AVX2_ONLY, torch.float16, ("avx512_fp16", "amx_fp16")),
        (ARM_NO_BF16, torch.bfloat16, ("bf16",)),
        (ARM_NO_BF16, torch.float16, None),
        (AVX2_ONLY, torch.float32, None),
    ],
)
def test_the_missing_instructions_are_named_for_the_cpus_architecture(text, dtype, missing, tmp_path):
    (tmp_path / "cpuinfo").write_text(text)
    assert missing_half_instructions(dtype, cpu_flags(tmp_path / "cpuinfo")) == missing


def test_unreadable_flags_claim_nothing(monkeypatch):
    monkeypatch.setattr(cpu_half, "CPUINFO", Path("/nonexistent/cpuinfo"))
    assert missing_half_instructions(torch.bfloat16) is None


class SeenBeforeTraining(Callback):
    """Records how many warnings had been issued when the first batch started."""

    def __init__(self, caught: list) -> None:
        self.caught, self.before_first_batch = caught, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.before_first_batch is None:
            self.before_first_batch = [w for w in self.caught if issubclass(w.category, EmulatedPrecisionWarning)]


def _fit(precision: str) -> tuple[list, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = SeenBeforeTraining(caught)
        strategy = FederatedBlockStrategy(num_clients=2, local_steps=1)
        trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(), seen], max_epochs=2, precision=precision)
        trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    return [w for w in caught if issubclass(w.category, EmulatedPrecisionWarning)], seen.before_first_batch


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about_before_training(precision, cpu):
    cpu(AVX2_ONLY)
    found, before_first_batch = _fit(precision)
    assert len(before_first_batch) == 1 and len(found) == 1
    message = str(found[0].message)
    assert f"`precision={precision}` computes in bfloat16 on the CPU" in message
    assert "avx512_bf16 or amx_bf16, missing from /proc/cpuinfo" in message
    assert "train with `precision='32-true'`" in message and "CausalLMModule(dtype='auto')" in message


@pytest.mark.parametrize(("text", "precision"), [(WITH_BF16, "bf16-mixed"), (AVX2_ONLY, "32-true")])
def test_no_warning_where_the_cpu_has_the_instructions_or_the_run_is_fp32(text, precision, cpu):
    cpu(text)
    assert _fit(precision)[0] == []


def test_the_command_line_is_told_its_own_options(cpu):
    cpu(AVX2_ONLY)
    trainer = quiet_trainer(precision="bf16-true")
    with pytest.warns(EmulatedPrecisionWarning) as caught:
        check_trainer(trainer, option_prefix="--trainer.")
    message = str(caught[0].message)
    assert "`--trainer.precision=bf16-true`" in message
    assert "`--trainer.precision 32-true` (and `--model.init_args.dtype auto`" in message
