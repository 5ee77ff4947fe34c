"""Seeded, repeatable training of a victim model, written out as a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import CheckpointMeta, build_model, save_checkpoint
from .data import class_names, get_spec, load_split


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    dataset: str
    data_root: str | None
    out: str
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_shift: int = 2  # random translation (pixels) for small grey images; 0 disables
    seed: int = 0
    device: str = "cpu"
    download: bool = False
    num_workers: int = 0
    command: str = ""


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]², zero-filled."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, padded.shape[3])
    cols = (dx[:, None] + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return 100.0 * correct / total


def train(cfg: TrainConfig) -> tuple[Path, CheckpointMeta]:
    """Train ``cfg.arch`` on ``cfg.dataset``, evaluate on its test split, write the checkpoint."""
    generator = seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    spec = get_spec(cfg.dataset)
    train_set = load_split(spec.name, cfg.data_root, "train", download=cfg.download)
    test_set = load_split(spec.name, cfg.data_root, "test", download=cfg.download)
    meta = CheckpointMeta(
        arch=cfg.arch,
        dataset=spec.name,
        classes=class_names(spec.name, cfg.data_root),
        input_shape=list(spec.input_shape),
        mean=list(spec.mean),
        std=list(spec.std),
        test_accuracy=0.0,
        seed=cfg.seed,
        command=cfg.command,
        extra={
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "max_shift": cfg.max_shift,
            "torch": torch.__version__,
        },
    )
    model = build_model(meta).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=cfg.num_workers,
        drop_last=True,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(loader))
    shift = cfg.max_shift if spec.size <= 32 else 0
    for epoch in range(cfg.epochs):
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for x, y in bar:
            x = random_shift(x, shift, generator).to(device)
            loss = F.cross_entropy(model(x), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        acc = evaluate(model, test_set, device)
        tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: test accuracy {acc:.2f}%")
    meta.test_accuracy = round(acc, 2)
    return save_checkpoint(model.cpu(), meta, cfg.out), meta
