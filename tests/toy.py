"""A user's own LightningModule and data, not ours: a small decoder-shaped MLP on regression data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ToyDecoder(nn.Module):
    def __init__(self, width: int = 8, num_layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(num_layers))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def toy_loss(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(module.net(x), y)


class ToyModule(LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, num_layers: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = ToyDecoder(num_layers=num_layers)
        self.optimizer_name, self.lr = optimizer, lr

    def training_step(self, batch, batch_idx):
        loss = toy_loss(self, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.5)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)


def toy_dataset(n: int = 48, seed: int = 1, identical_groups: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = (x.sum(dim=1, keepdim=True) * 0.5).sin()
    return TensorDataset(x, y)


def toy_loader(dataset: TensorDataset, batch_size: int = 4) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size)
