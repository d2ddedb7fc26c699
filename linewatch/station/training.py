"""Student training: SGD on the pyramid-matching loss; the checkpoint kept is the one with the lowest
validation loss (``select="val_loss"``) or the one whose scores best separate synthetic anomalies pasted
into the validation images from the clean ones (``select="synthetic"``, see :mod:`.synthetic`).

The images are decoded and resized once (uint8 in memory): re-decoding 900×900 PNGs every epoch
would cost more than the forward pass.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from linewatch.model.stfpm import STFPM


@dataclass
class TrainConfig:
    max_epochs: int = 40
    batch_size: int = 32
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    patience: int = 10  # epochs without a better validation loss before stopping
    min_delta: float = 1e-3  # relative improvement that counts as better
    schedule: str = "cosine"  # "cosine" (to 0 over max_epochs) or "constant" (the paper)
    seed: int = 0
    flip_augment: bool = False
    select: str = "val_loss"  # checkpoint: "val_loss" (lowest) or "synthetic" (best synthetic-anomaly AUROC)


@dataclass
class TrainResult:
    best_epoch: int
    epochs_run: int
    best_val_loss: float
    seconds: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


def split_indices(n: int, val_fraction: float, cal_fraction: float, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded disjoint train / validation / calibration index sets."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_cal = int(round(n * cal_fraction))
    n_val = int(round(n * val_fraction))
    if n - n_cal - n_val < 1:
        raise ValueError("not enough images left for training after the validation and calibration splits")
    cal = np.sort(order[:n_cal])
    val = np.sort(order[n_cal:n_cal + n_val])
    train = np.sort(order[n_cal + n_val:])
    return train, val, cal


SELECTIONS = ("val_loss", "synthetic")
AUROC_TIE = 1e-6  # synthetic AUROCs closer than this are a tie (broken by validation loss)


def is_better(epoch: dict[str, float], best: dict[str, float] | None, select: str, min_delta: float = 0.0) -> bool:
    """Does ``epoch`` (a history row: ``val_loss``, and ``synthetic_auroc`` when select is synthetic) beat
    ``best``? val_loss: lower by more than ``min_delta`` (relative). synthetic: higher AUROC; equal AUROC
    (within AUROC_TIE): the lower validation loss."""
    if select not in SELECTIONS:
        raise ValueError(f"checkpoint selection {select!r} is not one of {', '.join(SELECTIONS)}")
    if best is None:
        return True
    if select == "val_loss":
        return epoch["val_loss"] < best["val_loss"] * (1 - min_delta)
    a, b = epoch["synthetic_auroc"], best["synthetic_auroc"]
    if math.isnan(b) and not math.isnan(a):
        return True
    if a > b + AUROC_TIE:
        return True
    return abs(a - b) <= AUROC_TIE and epoch["val_loss"] < best["val_loss"]


def select_checkpoint(history: list[dict[str, float]], select: str, min_delta: float = 0.0) -> int:
    """The epoch (its ``epoch`` field) that ``is_better`` keeps, going through ``history`` in order."""
    best = None
    for row in history:
        if is_better(row, best, select, min_delta):
            best = row
    if best is None:
        raise ValueError("no epochs to choose from")
    return int(best["epoch"])


def image_scores(model: STFPM, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Image scores with the model's blur and reduction but no per-position normalisation (whose statistics
    come after training)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for b in _batches(len(images), batch_size, None):
            scores = model.scorer.plain_scores(*model.raw_pair(torch.from_numpy(images[b]).to(device)))
            out.append(scores.float().cpu().numpy())
    return np.concatenate(out) if out else np.empty(0, np.float32)


def synthetic_auroc(model: STFPM, clean: np.ndarray, anomalous: np.ndarray, batch_size: int,
                    device: torch.device) -> float:
    """AUROC of the model's scores, anomalous copies against the clean images."""
    from linewatch.station.accuracy import image_auroc

    s0 = image_scores(model, clean, batch_size, device)
    s1 = image_scores(model, anomalous, batch_size, device)
    return image_auroc(np.r_[np.zeros(len(s0)), np.ones(len(s1))], np.r_[s0, s1])


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
    idx = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, n, batch_size):
        yield idx[i:i + batch_size]


def evaluate_loss(model: STFPM, images: np.ndarray, batch_size: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in _batches(len(images), batch_size, None):
            x = torch.from_numpy(images[b]).to(device)
            total += float(model.loss(x)) * len(b)
            count += len(b)
    return total / max(count, 1)


def train_students(
    model: STFPM,
    train_images: np.ndarray,
    val_images: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = True,
    on_epoch: Callable[[int, STFPM], dict[str, float]] | None = None,
    anomalous: np.ndarray | None = None,
) -> TrainResult:
    """Train in place; on return the model holds the weights of the best validation epoch.

    ``anomalous``: synthetic-anomaly copies of ``val_images`` (same shape), made by the caller, e.g. at a
    resolution shared by several candidate input sizes so that their synthetic AUROCs compare. When given,
    every epoch records ``synthetic_auroc`` whatever the selection; when not, they are made here at the
    validation images' resolution, only for ``select="synthetic"``."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(device)
    opt = torch.optim.SGD(model.students.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_images) / cfg.batch_size)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs * steps_per_epoch)
    elif cfg.schedule == "constant":
        sched = None
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    have_val = len(val_images) > 0
    select = cfg.select if have_val else "val_loss"
    is_better({"val_loss": 0.0}, None, select)  # an unknown selection fails here, before any training
    if anomalous is not None and (not have_val or anomalous.shape != val_images.shape):
        raise ValueError(f"anomalous images {anomalous.shape} do not match the validation images {val_images.shape}")
    if anomalous is None and select == "synthetic":
        from linewatch.station.synthetic import make_anomalies

        anomalous = make_anomalies(val_images, seed=cfg.seed)[0]
    best = (math.inf, 0, copy.deepcopy(model.students.state_dict()))
    best_row: dict[str, float] | None = None
    history: list[dict[str, float]] = []
    since_best = 0
    stopped_early = False
    start = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_epochs, desc="training", unit="epoch")
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        run_loss, seen = 0.0, 0
        for b in _batches(len(train_images), cfg.batch_size, rng):
            x = torch.from_numpy(train_images[b])
            if cfg.flip_augment and rng.random() < 0.5:
                x = torch.flip(x, dims=[2])
            x = x.to(device)
            loss = model.loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            run_loss += float(loss.detach()) * len(b)
            seen += len(b)
        train_loss = run_loss / max(seen, 1)
        val_loss = evaluate_loss(model, val_images, cfg.batch_size, device) if have_val else train_loss
        row = {"epoch": epoch, "loss": train_loss, "val_loss": val_loss}
        if anomalous is not None:
            row["synthetic_auroc"] = synthetic_auroc(model, val_images, anomalous, cfg.batch_size, device)
        if on_epoch is not None:  # extra per-epoch measurements (studies); they never choose the checkpoint
            row.update(on_epoch(epoch, model))
        history.append(row)
        if is_better(row, best_row, select, cfg.min_delta):
            best_row = row
            best = (val_loss, epoch, copy.deepcopy(model.students.state_dict()))
            since_best = 0
        else:
            since_best += 1
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=best[1])
            bar.update(1)
        if since_best >= cfg.patience:
            stopped_early = True
            break
    if bar is not None:
        bar.close()
    model.students.load_state_dict(best[2])
    model.eval()
    return TrainResult(best_epoch=best[1], epochs_run=epoch, best_val_loss=best[0],
                       seconds=time.monotonic() - start, stopped_early=stopped_early, history=history)
