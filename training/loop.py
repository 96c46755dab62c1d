"""The training loop: one epoch, evaluation, the schedule and self-describing checkpoints."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training.nets import PixelClassifier
from training.tasks import Batches, Recipe, Task

__all__ = ["EpochResult", "evaluate", "fit", "predict", "train_one_epoch"]


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float | None  # None for the linear probe
    train_accuracy: float  # on augmented batches as trained; for the probe, on the un-augmented images
    eval_accuracy: float  # on the held-out split


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 mixed precision on the GPU (no loss scaling needed); full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """A linear warm-up, then a cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return factor


def _optimizer(
    model: PixelClassifier, recipe: Recipe, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    head_params = list(model.net.fc.parameters())
    head_ids = {id(p) for p in head_params}
    backbone_params = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [
            {"params": head_params, "lr": recipe.learning_rate},
            {"params": backbone_params, "lr": recipe.learning_rate * recipe.backbone_lr_scale},
        ],
        weight_decay=recipe.weight_decay,
    )
    total = recipe.epochs * steps_per_epoch
    warmup = max(1, round(recipe.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, warmup))
    return optimizer, scheduler


@torch.no_grad()
def _in_batches(
    function: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """Apply ``function`` to uint8 NHWC images batch by batch, in inference mode, and concatenate in FP32."""
    return torch.cat(
        [
            function(torch.from_numpy(np.array(images[start : start + batch_size])).to(device)).float()  # a copy
            for start in range(0, len(images), batch_size)
        ]
    )


def fit_linear_probe(
    model: PixelClassifier, images: np.ndarray, labels: np.ndarray, device: torch.device, l2: float
) -> float:
    """Fit the final layer alone, to convergence, on frozen features (L2-regularised logistic regression).

    Fine-tuning then starts from a head that already agrees with the pretrained features, so the first
    gradients do not tear those features apart. Returns the probe's accuracy on the images it was fitted on.
    """
    model.eval()
    features = _in_batches(model.features, images, device)
    targets = torch.from_numpy(labels.astype(np.int64)).to(device)
    fc = model.net.fc
    weight = torch.zeros_like(fc.weight, requires_grad=True)
    bias = torch.zeros_like(fc.bias, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, targets) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        fc.weight.copy_(weight)
        fc.bias.copy_(bias)
        return float(((features @ weight.T + bias).argmax(1) == targets).float().mean())


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    freeze_batchnorm: bool,
    description: str,
    max_steps: int | None = None,
    ema: AveragedModel | None = None,
) -> tuple[float, float]:
    """Run one pass over the training batches; returns (mean loss, accuracy on the augmented batches)."""
    model.train()
    if freeze_batchnorm:  # keep pretrained statistics: small batches of one domain would skew them
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    total_loss, correct, seen = 0.0, 0, 0
    total = len(batches) if max_steps is None else min(len(batches), max_steps)
    progress = tqdm(batches, desc=description, total=total, unit="batch", mininterval=2.0, dynamic_ncols=True)
    for step, (images, labels) in enumerate(progress):
        if max_steps is not None and step >= max_steps:
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).long()
        with _autocast(device):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        progress.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def predict(model: nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Class probabilities for uint8 NHWC images, in full precision (the reference the ONNX file must match)."""
    model.eval()
    return torch.softmax(_in_batches(model, images, device), dim=1).cpu().numpy()


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    """Top-1 accuracy on a held-out split."""
    return float((predict(model, images, device).argmax(1) == labels).mean())


def fit(
    task: Task,
    model: PixelClassifier,
    batches: Batches,
    train_views: tuple[np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray],
    recipe: Recipe,
    device: torch.device,
    checkpoint: Path,
    seed: int,
    max_steps: int | None = None,
) -> list[EpochResult]:
    """Train for ``recipe.epochs``, evaluating each epoch and rewriting the checkpoint after each.

    ``train_views`` are the training images without augmentation, for the linear probe (epoch 0 in the history).

    With ``recipe.ema_decay`` set, the exponential moving average of the weights is what gets evaluated,
    checkpointed and finally loaded back into ``model``: it is steadier than the last step's weights.
    """
    history: list[EpochResult] = []
    if recipe.linear_probe_l2 is not None:
        probe_accuracy = fit_linear_probe(model, *train_views, device, recipe.linear_probe_l2)
        history.append(EpochResult(0, None, probe_accuracy, evaluate(model, *held_out, device)))
        print(
            f"{task.name} linear probe: train acc {probe_accuracy:.4f}, "
            f"{task.test_split} acc {history[-1].eval_accuracy:.4f}",
            flush=True,
        )
    steps_per_epoch = min(len(batches), max_steps) if max_steps else len(batches)
    optimizer, scheduler = _optimizer(model, recipe, steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
        if recipe.ema_decay
        else None
    )
    trained = ema.module if ema is not None else model
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, recipe.epochs + 1):
        loss, accuracy = train_one_epoch(
            model,
            batches,
            optimizer,
            scheduler,
            loss_fn,
            device,
            freeze_batchnorm=recipe.freeze_batchnorm,
            description=f"{task.name} epoch {epoch}/{recipe.epochs}",
            max_steps=max_steps,
            ema=ema,
        )
        eval_accuracy = evaluate(trained, *held_out, device)
        history.append(EpochResult(epoch, loss, accuracy, eval_accuracy))
        print(
            f"{task.name} epoch {epoch}: loss {loss:.4f}, train acc {accuracy:.4f}, "
            f"{task.test_split} acc {eval_accuracy:.4f}",
            flush=True,
        )
        torch.save(
            {
                "task": task.name,
                "labels": list(task.labels),
                "input_dims": list(task.input_dims),
                "normalize": list(task.normalize),
                "model": trained.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "recipe": asdict(recipe),
                "seed": seed,
                "history": [asdict(h) for h in history],
            },
            checkpoint,
        )
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return history
