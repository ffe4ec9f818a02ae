import math

import lightning as L
import pytest
import torch

from lightning_parablock.data import IGNORE_INDEX, SyntheticArithmeticDataModule
from lightning_parablock.eval import GSM8KAccuracy, TokenPerplexity, evaluate_perplexity
from lightning_parablock.module import CausalLMModule

BATCH_1 = (["The answer is 42.", "#### 7", "no idea"], ["#### 42", 8, "3"])  # 1 of 3 right
BATCH_2 = (["A: 3/4", "-5 degrees"], ["0.75", "#### -5"])  # 2 of 2 right


def _fake_gather(other: GSM8KAccuracy):
    """A ``dist_sync_fn`` for a world of this process and ``other``: every state gathers [mine, other's]."""
    theirs = iter(other.metric_state.values())  # torchmetrics syncs the states in the order they were added
    return lambda tensor, group=None: [tensor, next(theirs)]


def test_gsm8k_accuracy_accumulates_over_batches():
    metric = GSM8KAccuracy()
    metric.update(*BATCH_1)
    assert metric.compute().item() == pytest.approx(1 / 3)
    metric.update(*BATCH_2)
    assert (int(metric.correct), int(metric.total), metric.count) == (3, 5, 5)
    assert metric.compute().item() == pytest.approx(3 / 5)
    metric.reset()
    assert metric.count == 0


def test_gsm8k_accuracy_merges_two_devices_by_summing():
    device_a, device_b = GSM8KAccuracy(), GSM8KAccuracy()
    device_a.update(*BATCH_1)
    device_b.update(*BATCH_2)

    synced = GSM8KAccuracy()
    synced.update(*BATCH_1)
    # The distributed path: sync() reduces each gathered state with its dist_reduce_fx.
    with synced.sync_context(dist_sync_fn=_fake_gather(device_b), distributed_available=lambda: True):
        assert (int(synced.correct), synced.count) == (3, 5)
    assert synced.count == 3  # back to this process's own state after the context

    device_a.merge_state(device_b)
    assert device_a.compute().item() == pytest.approx(3 / 5)  # pooled, not the mean of 1/3 and 1


def test_gsm8k_accuracy_is_nan_before_any_update_and_checks_lengths():
    metric = GSM8KAccuracy()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric.update(["1", "2"], ["1"])
    with pytest.raises(TypeError, match="not a single str"):
        metric.update("42", "42")


def test_token_perplexity_matches_a_hand_computation():
    # One sequence of 4 positions over a 3-token vocabulary; labels[0] is never predicted and labels[2] is masked.
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [1.0, -2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0, IGNORE_INDEX, 2]])
    # Position t predicts labels[t + 1]: (t=0 -> 0), (t=1 -> masked), (t=2 -> 2).
    nll_0 = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    nll_2 = -(3.0 - math.log(math.exp(1.0) + math.exp(-2.0) + math.exp(3.0)))
    metric = TokenPerplexity()
    metric.update(logits, labels)
    assert int(metric.tokens) == 2
    assert metric.mean_loss().item() == pytest.approx((nll_0 + nll_2) / 2, rel=1e-6)
    assert metric.compute().item() == pytest.approx(math.exp((nll_0 + nll_2) / 2), rel=1e-6)


def test_token_perplexity_weighs_tokens_not_batches():
    torch.manual_seed(0)
    long_logits, short_logits = torch.randn(1, 9, 5), torch.randn(1, 3, 5)
    long_labels, short_labels = torch.randint(0, 5, (1, 9)), torch.randint(0, 5, (1, 3))
    metric = TokenPerplexity()
    metric.update(long_logits, long_labels)
    metric.update(short_logits, short_labels)
    nll = torch.nn.functional.cross_entropy(
        torch.cat([long_logits[0, :-1], short_logits[0, :-1]]),
        torch.cat([long_labels[0, 1:], short_labels[0, 1:]]),
        reduction="sum",
    )
    assert int(metric.tokens) == 8 + 2
    assert metric.mean_loss().item() == pytest.approx(nll.item() / 10, rel=1e-6)

    other_device = TokenPerplexity()
    other_device.update(short_logits, short_labels)
    first_device = TokenPerplexity()
    first_device.update(long_logits, long_labels)
    first_device.merge_state(other_device)
    assert first_device.compute().item() == pytest.approx(metric.compute().item(), rel=1e-12)


def test_token_perplexity_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"got logits \(2, 4, 3\) and labels \(2, 5\)"):
        TokenPerplexity().update(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))


@pytest.fixture
def datamodule():
    return SyntheticArithmeticDataModule(num_examples=16, val_examples=12, batch_size=5, seed=0)


def test_perplexity_of_a_causal_lm_agrees_with_its_own_loss(tiny_llama_config, datamodule):
    model = CausalLMModule(config=tiny_llama_config, seed=0).model
    batch = next(iter(datamodule.val_dataloader()))
    model.eval()
    with torch.no_grad():
        output = model(**batch)
    metric = TokenPerplexity()
    metric.update(output.logits, batch["labels"])
    assert metric.mean_loss().item() == pytest.approx(output.loss.item(), rel=1e-5)

    model.train()
    result = evaluate_perplexity(model, datamodule.val_dataloader())
    assert model.training  # evaluated in eval mode, handed back as it was
    assert result["tokens"] == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in datamodule.val_dataloader())
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


class _PerplexityModule(CausalLMModule):
    """CausalLMModule that also logs token perplexity in validation, as a user would."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.val_perplexity = TokenPerplexity()

    def validation_step(self, batch, batch_idx):
        self.val_perplexity.update(self(**batch).logits, batch["labels"])
        self.log("val/perplexity", self.val_perplexity, on_epoch=True)


def test_token_perplexity_in_a_validation_loop(tiny_llama_config, datamodule):
    module = _PerplexityModule(config=tiny_llama_config, seed=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    expected = evaluate_perplexity(module.model, datamodule.val_dataloader())["perplexity"]
    assert trainer.callback_metrics["val/perplexity"].item() == pytest.approx(expected, rel=1e-6)
