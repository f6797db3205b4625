"""The training loop that runs on every Ray Train worker.

`train_loop_per_worker(config)` unpacks the config, builds the model, then per epoch
calls `train_one_epoch` and `evaluate`, and reports metrics plus a checkpoint once.
Shapes: images arrive as uint8 (B, H, W, 3) at the source size and become float
(B, 3, S, S) on the device in `preprocess`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from fashion_vit.config import METRIC, TrainConfig
from fashion_vit.metrics import classification_report
from fashion_vit.model import create_model, read_checkpoint, save_checkpoint
from fashion_vit.transforms import Preprocessing, preprocess

MODEL_FILE = "vit_model.pth"
STATE_FILE = "train_state.pt"  # optimizer/scheduler/epoch, only for resuming a trial
# The first report after a restore carries the epoch rows before it, as JSON (tune.restores).
EARLIER_EPOCHS = "earlier_epochs"
SHUFFLE_BUFFER = 4096  # rows; ~57 MB of 60x80 uint8 images


def train_loop_per_worker(config: dict) -> None:
    """config: train_config (asdict of the trial's TrainConfig), labels, preprocessing,
    train_rows, class_counts, and init (an ObjectRef of a SavedModel, or None)."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config["train_config"])
    labels: list[str] = config["labels"]
    # Images were decoded once for all trials; the input size may differ per trial.
    prep = replace(Preprocessing.from_dict(config["preprocessing"]), image_size=cfg.image_size)
    train_rows: int = config["train_rows"]

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS to the worker's CPU count (1 by default); size torch to it.
        torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker

    init = config.get("init")
    model, _ = create_model(cfg, labels, ray.get(init) if init is not None else None)
    steps_per_epoch = math.ceil(train_rows / world / cfg.batch_size)
    optimizer = _adamw(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    scheduler = _warmup_linear(optimizer, cfg.warmup_ratio, cfg.epochs * steps_per_epoch)
    start_epoch, restored = restore(ray.train.get_checkpoint(), model, optimizer, scheduler)
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    autocast = _autocast(device, cfg.bf16)
    weights = class_weights(config["class_counts"], cfg.class_weights)
    weights = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")  # not split: every worker sees all of it

    # The epochs before a restore, carried in each checkpoint: a trial resumed by Tune
    # starts its reports afresh, and tune.py's summary takes them from here.
    history = json.loads(restored.get(EARLIER_EPOCHS, "[]"))
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch * world + rank)  # flips differ per worker and epoch
        t0 = time.perf_counter()
        train_loss, seen = train_one_epoch(
            model,
            _epoch_batches(train_shard, cfg, device, max(train_rows // world, 1), epoch),
            optimizer,
            scheduler,
            prep,
            augment=cfg.augment,
            label_smoothing=cfg.label_smoothing,
            max_grad_norm=cfg.max_grad_norm,
            weights=weights,
            autocast=autocast,
        )
        train_seconds = time.perf_counter() - t0
        val_batches = val_data.iter_torch_batches(batch_size=256, device=device) if rank == 0 else None
        train_loss, seen, val_loss, report = _validate_and_sum(
            model, val_batches, prep, labels, autocast, device, world, train_loss, seen
        )
        metrics = {
            **_epoch_metrics(epoch, train_loss, seen, val_loss, report, time.perf_counter() - t0, train_seconds),
            **(restored if epoch == start_epoch else {}),  # after a restore: what it cost (tune.restores)
        }
        history.append({k: v for k, v in metrics.items() if k not in restored})
        save_and_report(
            metrics, report, epoch, model, optimizer, scheduler, prep, config["train_config"], rank, cfg.epochs, history
        )


def _epoch_metrics(epoch: int, train_loss, seen, val_loss, report: dict, seconds: float, train_seconds: float) -> dict:
    """The epoch's row, as Tune and summary.json get it (summed over workers)."""
    return {
        "epoch": epoch + 1,
        "train_loss": float(train_loss / max(seen, 1)),
        "val_loss": float(val_loss / max(report["num_examples"], 1)),
        METRIC: report["accuracy"],
        "val_macro_f1": report["macro_f1"],
        "epoch_seconds": seconds,
        "train_seconds": train_seconds,
        "images_per_second": float(seen / train_seconds),
    }


def _epoch_batches(shard, cfg: TrainConfig, device, rows: int, epoch: int):
    """The worker's shard for one epoch, shuffled locally with the epoch's seed."""
    return shard.iter_torch_batches(
        batch_size=cfg.batch_size,
        device=device,
        local_shuffle_buffer_size=min(SHUFFLE_BUFFER, rows),
        local_shuffle_seed=cfg.seed + epoch,
        # From pinned memory the copy to a GPU is asynchronous; from pageable memory it
        # waits behind the kernels already queued.
        pin_memory=device.type == "cuda",
    )


def _validate_and_sum(model, val_batches, prep, labels, autocast, device, world: int, train_loss, seen):
    """The whole validation set on rank 0 (`val_batches`; None elsewhere, whose zeros
    add nothing), then the epoch's sums over all workers: (train loss sum, images seen,
    val loss sum, val classification report)."""
    k = len(labels)
    if val_batches is not None:
        val_loss, val_cm = evaluate(main_model(model), val_batches, prep, k, autocast)
    else:
        val_loss, val_cm = 0.0, np.zeros((k, k), np.int64)
    totals = _all_reduce(np.concatenate([[train_loss, seen, val_loss], val_cm.ravel()]), device, world)
    val_cm = totals[3:].round().astype(np.int64).reshape(k, k)
    return totals[0], totals[1], totals[2], classification_report(val_cm, labels)


def main_model(model):
    """The ViTClassifier inside DDP's wrapper."""
    return getattr(model, "module", model)


def worker_device() -> torch.device:
    """This worker's GPU, or the CPU. A worker Ray gave a GPU whose torch has no CUDA (a
    CPU build, or the logical GPUs the tests start Ray with) trains on the CPU: the
    resource plan is Ray's, the arithmetic goes where it can."""
    import ray.train.torch

    return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")


def restore(checkpoint, model, optimizer, scheduler) -> tuple[int, dict]:
    """Load a Train checkpoint's weights and optimizer/scheduler state into place.

    Returns (the epoch to start from, 0 without a checkpoint; what the restore cost, {}
    without one): a restarted worker group or a resumed trial so continues where it
    stopped, and says from which epoch's checkpoint (`restored_from_epoch`) and how long
    after that checkpoint was written it started again (`seconds_since_checkpoint`: the
    lost part of the next epoch plus the time to notice and restart)."""
    if not checkpoint:
        return 0, {}
    with checkpoint.as_directory() as d:
        saved = read_checkpoint(os.path.join(d, MODEL_FILE))
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    main_model(model).load_state_dict(saved.state_dict)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    cost = {"restored_from_epoch": state["epoch"] + 1, EARLIER_EPOCHS: state.get("history", "[]")}
    if "saved_at" in state:  # checkpoints written before it was recorded have none
        cost["seconds_since_checkpoint"] = max(0.0, time.time() - state["saved_at"])
    return state["epoch"] + 1, cost


def save_and_report(
    metrics: dict,
    val_report: dict,
    epoch: int,
    model,
    optimizer,
    scheduler,
    prep,
    train_config: dict,
    rank: int,
    epochs: int,
    history: list[dict],
) -> None:
    """Report the epoch's metrics from every worker (Ray Train expects all to report),
    with a checkpoint from rank 0: the model as vit_model.pth and the state to resume
    (with `history`, the epoch rows so far)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(
                os.path.join(tmp, MODEL_FILE), main_model(model), prep, train_config, {"val": val_report, **metrics}
            )
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "saved_at": time.time(),  # wall clock: a restore on another node reports the time lost
                "history": json.dumps(history, default=float),  # JSON: torch.load(weights_only) takes no numpy scalars
            }
            torch.save(state, os.path.join(tmp, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            print(
                f"epoch {epoch + 1}/{epochs}: train_loss {metrics['train_loss']:.4f} "
                f"val_loss {metrics['val_loss']:.4f} val_acc {metrics[METRIC]:.4f} "
                f"val_macro_f1 {metrics['val_macro_f1']:.4f} {metrics['images_per_second']:.0f} img/s",
                flush=True,
            )
        ray.train.report(metrics, checkpoint=checkpoint)


def train_one_epoch(
    model,
    batches,
    optimizer,
    scheduler,
    prep: Preprocessing,
    *,
    augment: str,
    label_smoothing: float,
    max_grad_norm: float,
    weights,
    autocast,
):
    """One pass over `batches`; returns (summed loss, images seen). `weights`: per-class
    cross-entropy weights, or None; `max_grad_norm` 0: no clipping."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    seen = 0
    for batch in batches:
        x = preprocess(batch["image"], prep, augment=augment)
        y = batch["label"]
        with autocast():
            logits = model(pixel_values=x).logits
        loss = _loss(logits.float(), y, weights, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        # Accumulate on the device: .item() per step would stall a GPU every batch.
        loss_sum = loss_sum.to(loss.device) + loss.detach().double() * len(y)
        seen += len(y)
    return float(loss_sum), seen


@torch.no_grad()
def evaluate(model, batches, prep: Preprocessing, num_classes: int, autocast):
    """Returns (summed cross-entropy, confusion matrix) over `batches`."""
    model.eval()
    # Summed on the device and read once at the end, not synced every batch.
    loss_sum = 0.0
    cm: torch.Tensor | int = 0  # still 0 after no batches
    for batch in batches:
        x = preprocess(batch["image"], prep)
        y = batch["label"]
        with autocast():
            logits = model(pixel_values=x).logits.float()
        loss_sum = loss_sum + F.cross_entropy(logits, y, reduction="sum").double()
        cm = cm + torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    counts = np.zeros(num_classes * num_classes, np.int64) if isinstance(cm, int) else cm.cpu().numpy()
    return float(loss_sum), counts.reshape(num_classes, num_classes)


def _loss(logits, y, weights, label_smoothing: float):
    """Cross-entropy, each image weighted by its class. Not F.cross_entropy(weight=...):
    with label smoothing that also weights the smoothing term by every class's weight,
    which pulls all predictions toward the rare classes (seen on the full data: validation
    loss 0.68 against 0.21, test accuracy 1.1 points lower)."""
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")
    if weights is None:
        return loss.mean()
    w = weights[y]
    return (loss * w).sum() / w.sum()


def class_weights(counts: list[int], mode: str) -> list[float] | None:
    """Cross-entropy weight per class from its training count: None for "none";
    n / (k * n_c) for "balanced" (every class weighs the same in total), its square root
    for "sqrt" (rare classes count more, without making ~20 images as loud as ~15,000).
    A class with no training rows gets weight 0."""
    if mode == "none":
        return None
    n_c = np.asarray(counts, dtype=np.float64)
    present = n_c > 0
    w = np.zeros_like(n_c)
    w[present] = n_c.sum() / (present.sum() * n_c[present])
    return (np.sqrt(w) if mode == "sqrt" else w).tolist()


def _adamw(model, lr: float, weight_decay: float, layer_decay: float = 1.0):
    """AdamW with, as transformers' Trainer does, no weight decay on biases and LayerNorm
    weights; with layer_decay < 1, each block's rate shrinks with its depth from the head
    (BEiT's layer-wise decay), so the pretrained lower blocks move least."""
    depth = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        groups.setdefault((layer_index(name, depth), p.ndim >= 2), []).append(p)
    return torch.optim.AdamW(
        [
            {"params": params, "lr": lr * layer_decay ** (depth + 1 - layer), "weight_decay": weight_decay * decays}
            for (layer, decays), params in sorted(groups.items())
        ],
        lr=lr,
    )


def layer_index(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for encoder block i, depth + 1 for the final norm and head."""
    if name.startswith("vit.embeddings."):
        return 0
    # vit.layers.<i>. in transformers 5, vit.encoder.layer.<i>. before.
    block = re.match(r"vit\.(?:encoder\.)?layers?\.(\d+)\.", name)
    return int(block.group(1)) + 1 if block else depth + 1


def _warmup_linear(optimizer, warmup_ratio: float, total_steps: int):
    """Linear warmup over warmup_ratio of the steps, then linear decay to 0 (the
    transformers Trainer default schedule, which the baseline recipe assumes)."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _all_reduce(values: np.ndarray, device: torch.device, world: int) -> np.ndarray:
    if world == 1:
        return values.astype(np.float64)
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().numpy()
