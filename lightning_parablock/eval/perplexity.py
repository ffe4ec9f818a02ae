"""Token-level loss and perplexity of a causal LM, as a metric that sums exactly across batches and devices.

A Hugging Face model's ``.loss`` is the mean over one batch's supervised tokens; averaging those means
over batches weighs a token in a short batch more than one in a long batch. Summing the negative
log-likelihood and the token count instead gives every supervised token the same weight, however the
data is batched or split across processes.
"""

import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from transformers import PreTrainedModel

from lightning_parablock.data.formatting import IGNORE_INDEX


class TokenPerplexity(Metric):
    """``exp`` of the mean negative log-likelihood over every supervised token seen.

    :meth:`update` takes a causal LM's ``logits`` and the batch's ``labels`` (``-100`` where no loss) and
    shifts them as the model's own loss does: the logits at position ``t`` predict the label at ``t + 1``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    nll_sum: torch.Tensor
    tokens: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: ``logits`` of shape ``(batch, seq, vocab)``, ``labels`` of shape ``(batch, seq)``."""
        if logits.ndim != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                "`logits` must be (batch, seq, vocab) and `labels` (batch, seq) with the same batch and seq, got"
                f" logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
            )
        targets = labels[:, 1:].reshape(-1).to(logits.device)
        predictions = logits[:, :-1].reshape(-1, logits.size(-1)).float()
        nll = F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        # rebinding, not +=: states reset under a Trainer's inference mode cannot be updated in place later
        self.nll_sum = self.nll_sum + nll.double()
        self.tokens = self.tokens + (targets != IGNORE_INDEX).sum()

    def compute(self) -> torch.Tensor:
        """Perplexity; ``nan`` before any supervised token was seen."""
        return torch.exp(self.nll_sum / self.tokens)

    def mean_loss(self) -> torch.Tensor:
        """The token-weighted mean negative log-likelihood in nats, summed over processes like :meth:`compute`."""
        with self.sync_context():
            return self.nll_sum / self.tokens


@torch.no_grad()
def evaluate_perplexity(
    model: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]], device: Optional[torch.device] = None
) -> dict[str, float]:
    """Token-weighted loss and perplexity of ``model`` over batches of ``input_ids``, ``attention_mask``, ``labels``.

    Args:
        model: A causal LM returning ``.logits``; put in eval mode for the call, then back in its own mode.
        batches: E.g. a validation ``DataLoader`` with :class:`~lightning_parablock.data.SFTCollator`.
        device: Where to run; by default where the model's parameters are.

    Returns:
        ``{"loss": mean NLL per supervised token, "perplexity": exp(loss), "tokens": supervised tokens}``.
    """
    device = device if device is not None else next(model.parameters()).device
    metric = TokenPerplexity().to(device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            metric.update(output.logits, batch["labels"].to(device))
    finally:
        model.train(was_training)
    with metric.sync_context():
        loss, tokens = float(metric.nll_sum / metric.tokens), int(metric.tokens)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
