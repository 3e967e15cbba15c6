"""A tiny Lightning classification task shared by the Lightning tests and the DDP script."""

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def dataset(n: int = 96, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def loader(batch_size: int = 16, n: int = 96) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=False)


class TinyClassifier(LightningModule):
    """An MLP trained with plain SGD; ``criterion`` is what the callback measures by default."""

    def __init__(self, lr: float = 0.5, seed: int = 0, scheduler: bool = False, optimizer=None):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        self.criterion = nn.CrossEntropyLoss()
        self.lr, self.scheduler, self.make_optimizer = lr, scheduler, optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.make_optimizer is not None:
            return self.make_optimizer(self)
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.scheduler:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 10)}
        return opt
