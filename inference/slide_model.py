"""Slide-level learning on compressed slides: a small CNN over NIC grids (Tellez et al.).

The CNN sees a grid's embeddings (standardised per channel on the training slides) and its
tissue mask; its features are averaged and max-pooled over tissue cells only, so empty cells
and padding never count. Training augments with the grid's flips and right-angle rotations.
`cross_validate` gives out-of-fold predictions and metrics; `fit` trains on every slide.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

TASKS = ("classification", "regression")


class GridCNN(nn.Module):
    def __init__(self, channels: int, outputs: int, width: int = 64, dropout: float = 0.3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Dropout2d(0.1),
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(2 * width, outputs)

    def forward(self, grids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        features = self.body(grids) * mask
        mean = features.sum((2, 3)) / mask.sum((2, 3)).clamp(min=1)
        peak = (features - 1e4 * (1 - mask)).amax((2, 3))
        return self.head(torch.cat([mean, peak], 1))


@dataclass
class Settings:
    epochs: int = 80
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-3
    seed: int = 0


@dataclass
class SlideModel:
    """A trained slide-level model and what it needs to predict."""

    net: GridCNN
    task: str
    classes: list[str]  # classification: class names, output k = classes[k]
    mean: np.ndarray
    std: np.ndarray
    target_scale: tuple[float, float] = (0.0, 1.0)  # regression: (mean, std) of the target
    info: dict = field(default_factory=dict)

    def predict(self, grids: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
        """Classification: (n, classes) probabilities; regression: (n,) values."""
        self.net.eval()
        with torch.inference_mode():
            x, m = _batch([self._standardise(g) for g in grids], masks)
            out = self.net(x, m)
        if self.task == "regression":
            return out[:, 0].numpy() * self.target_scale[1] + self.target_scale[0]
        if out.shape[1] == 1:
            p = torch.sigmoid(out[:, 0]).numpy()
            return np.stack([1 - p, p], 1)
        return out.softmax(1).numpy()

    def _standardise(self, grid: np.ndarray) -> np.ndarray:
        return ((grid.astype(np.float32) - self.mean) / self.std).astype(np.float32)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "state_dict": self.net.state_dict(),
                "outputs": self.net.head.out_features, "width": self.net.body[1].out_channels,
                "task": self.task, "classes": self.classes, "mean": self.mean, "std": self.std,
                "target_scale": self.target_scale, "info": self.info,
            },
            buffer,
        )  # fmt: skip
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SlideModel:
        payload = torch.load(io.BytesIO(data), weights_only=False)
        channels = payload["mean"].shape[-1]
        net = GridCNN(channels, payload["outputs"], payload["width"])
        net.load_state_dict(payload["state_dict"])
        return cls(
            net, payload["task"], payload["classes"], payload["mean"], payload["std"],
            tuple(payload["target_scale"]), payload["info"],
        )  # fmt: skip


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fit(
    grids: list[np.ndarray],
    masks: list[np.ndarray],
    targets: list,
    task: str,
    settings: Settings | None = None,
) -> SlideModel:
    """Train on every slide given: classification on class names, regression on numbers."""
    settings = settings or Settings()
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    cells = np.concatenate([g[m] for g, m in zip(grids, masks, strict=True)]).astype(np.float32)
    mean, std = cells.mean(0), cells.std(0)
    std[std <= 1e-6 * max(float(np.abs(cells).max()), 1e-30)] = 1.0  # constant channels stay 0
    classes: list[str] = []
    if task == "classification":
        classes = sorted({str(t) for t in targets})
        if len(classes) < 2:
            raise ValueError("classification needs at least two classes")
        y = torch.tensor([classes.index(str(t)) for t in targets])
        outputs = 1 if len(classes) == 2 else len(classes)
        scale = (0.0, 1.0)
    else:
        values = np.asarray(targets, dtype=np.float64)
        scale = (float(values.mean()), float(values.std() or 1.0))
        y = torch.tensor((values - scale[0]) / scale[1], dtype=torch.float32)
        outputs = 1
    model = SlideModel(GridCNN(cells.shape[1], outputs), task, classes, mean, std, scale)
    standard = [model._standardise(g) for g in grids]
    optimiser = torch.optim.AdamW(
        model.net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    model.net.train()
    for _ in range(settings.epochs):
        order = rng.permutation(len(grids))
        for start in range(0, len(order), settings.batch_size):
            chosen = order[start : start + settings.batch_size]
            pairs = [_augment(standard[i], masks[i], rng) for i in chosen]
            x, m = _batch([p[0] for p in pairs], [p[1] for p in pairs])
            out = model.net(x, m)
            target = y[torch.as_tensor(chosen)]
            if task == "regression":
                loss = nn.functional.mse_loss(out[:, 0], target)
            elif outputs == 1:
                loss = nn.functional.binary_cross_entropy_with_logits(out[:, 0], target.float())
            else:
                loss = nn.functional.cross_entropy(out, target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model


def fold_indices(
    targets: list, task: str, folds: int, seed: int, groups: list | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs: stratified for classification; with `groups` (e.g. patients)
    no group is split between train and test."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    if task == "classification":
        splitter = (
            StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
            if groups is not None
            else StratifiedKFold(folds, shuffle=True, random_state=seed)
        )
    else:
        splitter = (
            GroupKFold(folds)
            if groups is not None
            else KFold(folds, shuffle=True, random_state=seed)
        )
    return list(splitter.split(np.zeros(len(targets)), targets, groups))


def cross_validate(
    grids: list[np.ndarray],
    masks: list[np.ndarray],
    targets: list,
    task: str,
    folds: int = 5,
    settings: Settings | None = None,
    groups: list | None = None,
) -> tuple[np.ndarray, dict]:
    """Out-of-fold predictions and their metrics, over `fold_indices` folds."""
    settings = settings or Settings()
    labels = [str(t) for t in targets] if task == "classification" else targets
    out_of_fold = None
    for train, test in fold_indices(labels, task, folds, settings.seed, groups):
        model = fit(
            [grids[i] for i in train], [masks[i] for i in train], [targets[i] for i in train],
            task, settings,
        )  # fmt: skip
        predicted = model.predict([grids[i] for i in test], [masks[i] for i in test])
        if task == "classification":  # align the fold's classes with every class
            full = np.zeros((len(test), len(set(labels))))
            order = sorted(set(labels))
            for k, name in enumerate(model.classes):
                full[:, order.index(name)] = predicted[:, k]
            predicted = full
        if out_of_fold is None:
            out_of_fold = np.zeros((len(targets), *predicted.shape[1:]))
        out_of_fold[test] = predicted
    return out_of_fold, metrics(out_of_fold, targets, task)


def metrics(predicted: np.ndarray, targets: list, task: str) -> dict:
    """AUC and accuracy (classification) or Spearman correlation and MAE (regression)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import accuracy_score, roc_auc_score

    if task == "regression":
        values = np.asarray(targets, dtype=float)
        return {
            "spearman": float(spearmanr(predicted, values).statistic),
            "mae": float(np.abs(predicted - values).mean()),
        }
    classes = sorted({str(t) for t in targets})
    truth = np.array([classes.index(str(t)) for t in targets])
    auc = (
        roc_auc_score(truth, predicted[:, 1])
        if len(classes) == 2
        else roc_auc_score(truth, predicted, multi_class="ovr")
    )
    return {"auc": float(auc), "accuracy": float(accuracy_score(truth, predicted.argmax(1)))}


def _augment(grid: np.ndarray, mask: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    k = int(rng.integers(4))
    grid, mask = np.rot90(grid, k, (0, 1)), np.rot90(mask, k, (0, 1))
    if rng.random() < 0.5:
        grid, mask = grid[::-1], mask[::-1]
    return np.ascontiguousarray(grid), np.ascontiguousarray(mask)


def _batch(grids: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded (N, C, H, W) grids and (N, 1, H, W) masks."""
    h = max(g.shape[0] for g in grids)
    w = max(g.shape[1] for g in grids)
    x = np.zeros((len(grids), grids[0].shape[2], h, w), dtype=np.float32)
    m = np.zeros((len(grids), 1, h, w), dtype=np.float32)
    for i, (g, k) in enumerate(zip(grids, masks, strict=True)):
        x[i, :, : g.shape[0], : g.shape[1]] = g.transpose(2, 0, 1) * k
        m[i, 0, : g.shape[0], : g.shape[1]] = k
    return torch.from_numpy(x), torch.from_numpy(m)
