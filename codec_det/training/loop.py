"""The fine-tuning loop: SGD with warm-up and cosine decay, optional distillation, AMP, DDP, resumption.

:func:`finetune` trains a classifier in place and :func:`evaluate` measures
top-1 and top-5 accuracy. Both work in a single process or under
``torchrun`` (one process per device, initialised with
:func:`codec_det.training.distributed.init_distributed`).

Resumption is exact on a CPU: a run interrupted after any checkpoint and
resumed from it ends with the same parameters as an uninterrupted run, when
the loaders come from :func:`codec_det.training.data.build_train_loader`.
On CUDA, cuDNN's non-deterministic kernels make runs differ in the last bits
unless ``torch.use_deterministic_algorithms(True)`` is set.

NOTE: the CUDA paths (float16 autocast with GradScaler, NCCL) have not been
run by the test suite, which runs on CPU; the CPU paths and two-process Gloo
training are tested.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from codec_det.training.checkpointing import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LAST_CHECKPOINT,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from codec_det.training.distillation import DistillationLoss
from codec_det.training.distributed import (
    DistributedContext,
    all_gather_objects,
    all_reduce_sum,
    broadcast_buffers,
)

__all__ = ["build_optimizer", "build_scheduler", "evaluate", "finetune"]

logger = logging.getLogger(__name__)

# Loss and accuracy are read back from the device every this many steps, so
# that a GPU is not synchronised on every step.
_PROGRESS_EVERY = 10


def build_optimizer(model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                    nesterov: bool = False) -> torch.optim.SGD:
    """Build SGD with momentum over the trainable parameters of ``model``."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be non-negative, got {weight_decay}")
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                    warmup_factor: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Build a per-step schedule: linear warm-up from ``warmup_factor * lr`` to ``lr``, then cosine decay to 0."""
    if total_steps <= 0:
        raise ValueError(f"total steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warm-up steps must be in 0..{total_steps}, got {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _default_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _batch_to(images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device | str | None = None,
             amp: bool = False, channels_last: bool = False, progress: bool = False) -> dict[str, float]:
    """Measure top-1 and top-5 accuracy (in percent) and the mean cross-entropy of ``model`` on ``loader``.

    Under a process group each rank evaluates its shard of ``loader`` and the
    counts are summed over ranks, so every rank returns the same numbers.
    Top-5 is top-``K`` for a model with ``K < 5`` classes.

    Returns:
        ``{"top1", "top5", "loss", "count"}``.
    """
    model = _unwrap(model)
    device = torch.device(device) if device is not None else _default_device(model)
    was_training = model.training
    model.eval()

    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    batches = tqdm(loader, desc="evaluating", leave=False, disable=not progress, dynamic_ncols=True)
    for images, targets in batches:
        images, targets = _batch_to(images, targets, device, channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == targets[:, None]
        totals[0] += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += targets.numel()
    model.train(was_training)

    all_reduce_sum(totals)
    loss_sum, top1, top5, count = totals.tolist()
    if count == 0:
        raise ValueError("the evaluation loader yielded no images")
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss_sum / count,
            "count": int(count)}


def _run_config(*, epochs: int, lr: float, steps_per_epoch: int, batch_size: int | None, world_size: int,
                kd_alpha: float, kd_temperature: float, teacher: bool) -> dict[str, Any]:
    return {
        "epochs": epochs,
        "lr": lr,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "world_size": world_size,
        "teacher": teacher,
        "kd_alpha": kd_alpha,
        "kd_temperature": kd_temperature,
    }


def _check_resume_config(saved: dict[str, Any], current: dict[str, Any], step_in_epoch: int, path: Path) -> None:
    """Raise when a mid-epoch resume cannot continue the saved epoch; log other differences."""
    if step_in_epoch > 0:
        for key in ("steps_per_epoch", "batch_size", "world_size"):
            if saved.get(key) != current[key]:
                raise ValueError(
                    f"checkpoint {path} stopped in the middle of an epoch with {key}={saved.get(key)}, "
                    f"but this run has {key}={current[key]}; resume with the same data, --batch-size and "
                    "number of processes"
                )
    for key, value in current.items():
        if saved.get(key) != value:
            logger.warning("resuming with %s=%s; the checkpoint was written with %s=%s",
                           key, value, key, saved.get(key))


def _skip_batches(loader: DataLoader, count: int):
    """Return an iterator over ``loader`` that starts ``count`` batches into the epoch."""
    sampler = getattr(loader, "sampler", None)
    if count == 0:
        return iter(loader)
    if hasattr(sampler, "set_start"):
        sampler.set_start(count * loader.batch_size)
        return iter(loader)
    logger.warning(
        "the training loader's sampler cannot skip samples; reading and dropping %d batches to reach the "
        "resume point (random augmentations of the rest of the epoch may differ from an uninterrupted run)",
        count,
    )
    return itertools.islice(iter(loader), count, None)


def finetune(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
    warmup_epochs: float = 0.0,
    label_smoothing: float = 0.0,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 4.0,
    device: torch.device | str | None = None,
    amp: bool = False,
    channels_last: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
    context: DistributedContext | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place with SGD, and evaluate it after every epoch.

    The loss is cross-entropy, or with a ``teacher`` the Hinton distillation
    mix ``(1 - kd_alpha) CE + kd_alpha T^2 KL`` at temperature
    ``kd_temperature``. The learning rate warms up linearly over
    ``warmup_epochs`` and then follows a cosine decay to 0, updated every step.

    Args:
        model: the classifier; moved to ``device`` and trained in place (wrapped
            in ``DistributedDataParallel`` while training under a process group).
        train_loader: training batches ``(images (B, 3, H, W), labels (B,))``;
            :func:`~codec_det.training.data.build_train_loader` makes one that
            resumes exactly.
        val_loader: evaluation batches, see :func:`evaluate`.
        epochs: total number of epochs, including those done before a resume.
        lr: peak learning rate.
        teacher: the uncompressed model for distillation; kept in eval mode.
        device: defaults to ``context.device``, else the model's device.
        amp: float16 autocast with a gradient scaler; ignored (with a log
            line) when the device is not CUDA.
        checkpoint_dir: where ``last.pth`` is written after every epoch and
            every ``checkpoint_every`` steps (0: at epoch ends only); None
            writes no checkpoint.
        resume: continue from ``checkpoint_dir/last.pth`` when it exists.
        context: rank and world size; only rank 0 logs and writes checkpoints.

    Returns:
        ``{"top1", "top5", "loss", "best_top1", "best_epoch", "epochs", "steps", "history"}``;
        ``history`` has one dict per epoch with its training loss and top-1,
        validation metrics, learning rate and time.
    """
    context = context if context is not None else DistributedContext()
    device = torch.device(device) if device is not None else (
        context.device if context.distributed else _default_device(model)
    )
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint interval must be non-negative, got {checkpoint_every}")
    amp_enabled = amp and device.type == "cuda"
    if amp and not amp_enabled:
        logger.info("AMP requested but the device is %s; training in float32", device.type)
    _prepare_models(model, teacher, device, channels_last)

    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(0)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batch; use a smaller batch size or more images")

    optimizer = build_optimizer(model, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    total_steps = epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, total_steps=total_steps,
                                warmup_steps=min(round(warmup_epochs * steps_per_epoch), total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_enabled)
    if teacher is not None and kd_alpha == 0:
        logger.info("a teacher was given with kd_alpha 0; training on cross-entropy only")
    criterion = DistillationLoss(alpha=kd_alpha if teacher is not None else 0.0, temperature=kd_temperature,
                                 label_smoothing=label_smoothing)
    config = _run_config(epochs=epochs, lr=lr, steps_per_epoch=steps_per_epoch,
                         batch_size=getattr(train_loader, "batch_size", None), world_size=context.world_size,
                         kd_alpha=criterion.alpha, kd_temperature=kd_temperature, teacher=teacher is not None)

    state = _TrainingState()
    checkpoint_path = Path(checkpoint_dir) / LAST_CHECKPOINT if checkpoint_dir is not None else None
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        state = _restore(checkpoint_path, model, optimizer, scheduler, scaler, config, context)
    elif resume and checkpoint_path is not None:
        logger.info("no checkpoint at %s; starting from the first epoch", checkpoint_path)

    trainer = _Trainer(
        model=model,
        teacher=teacher,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        writer=_CheckpointWriter(checkpoint_path, context, model, optimizer, scheduler, scaler, config),
        context=context,
        device=device,
        amp=amp_enabled,
        channels_last=channels_last,
        checkpoint_every=checkpoint_every,
        progress=progress,
    )
    for epoch in range(state.epoch, epochs):
        start = time.perf_counter()
        meters = trainer.train_epoch(train_loader, state, epoch=epoch, epochs=epochs, steps_per_epoch=steps_per_epoch)
        train_loss, train_top1, train_count = all_reduce_sum(meters).tolist()

        broadcast_buffers(model)
        val = evaluate(model, val_loader, device=device, amp=amp_enabled, channels_last=channels_last)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss / train_count,
            "train_top1": 100.0 * train_top1 / train_count,
            "top1": val["top1"],
            "top5": val["top5"],
            "loss": val["loss"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - start,
        }
        state.history.append(metrics)
        if metrics["top1"] > state.best_top1:
            state.best_top1, state.best_epoch = metrics["top1"], epoch + 1
        logger.info(
            "epoch %d/%d: train loss %.4f top-1 %.2f%%; val top-1 %.2f%% top-5 %.2f%% loss %.4f; lr %.4g; %.1f s",
            epoch + 1, epochs, metrics["train_loss"], metrics["train_top1"], metrics["top1"], metrics["top5"],
            metrics["loss"], metrics["lr"], metrics["seconds"],
        )

        state.epoch, state.step_in_epoch, state.meters = epoch + 1, 0, [0.0, 0.0, 0.0]
        trainer.writer.write(state)

    if not state.history:
        raise ValueError(f"checkpoint {checkpoint_path} has no finished epoch to report")
    last = state.history[-1]
    return {
        "top1": last["top1"],
        "top5": last["top5"],
        "loss": last["loss"],
        "best_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "epochs": epochs,
        "steps": state.global_step,
        "history": list(state.history),
    }


def _prepare_models(model: nn.Module, teacher: nn.Module | None, device: torch.device, channels_last: bool) -> None:
    """Move both models to ``device``; freeze the teacher in eval mode."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is None:
        return
    teacher.to(device).eval()
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)


class _TrainingState:
    """Progress of a run: what a checkpoint stores besides the model, optimizer, scheduler and scaler."""

    def __init__(self):
        self.epoch = 0  # the epoch in progress, 0-based, or ``epochs`` when training is done
        self.step_in_epoch = 0  # optimizer steps already done in that epoch
        self.global_step = 0
        self.best_top1 = -1.0
        self.best_epoch = 0
        self.history: list[dict[str, float]] = []
        self.meters = [0.0, 0.0, 0.0]  # this rank's loss sum, top-1 hits and count in the current epoch


class _CheckpointWriter:
    """Gather every rank's RNG state and epoch meters, then let rank 0 write ``last.pth``."""

    def __init__(self, path: Path | None, context: DistributedContext, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler, config: dict[str, Any]):
        self.path = path
        self.context = context
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.config = config

    def write(self, state: _TrainingState) -> None:
        if self.path is None:
            return
        ranks = all_gather_objects({"rng": capture_rng_state(), "meters": list(state.meters)})
        if not self.context.is_main:
            return
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": state.epoch,
                "step_in_epoch": state.step_in_epoch,
                "global_step": state.global_step,
                "best_top1": state.best_top1,
                "best_epoch": state.best_epoch,
                "history": state.history,
                "ranks": ranks,
                "config": self.config,
            },
            self.path,
        )
        logger.debug("wrote %s (epoch %d, step %d)", self.path, state.epoch, state.step_in_epoch)


class _Trainer:
    """The optimisation step and one epoch of it, with mid-epoch checkpoints."""

    def __init__(self, *, model: nn.Module, teacher: nn.Module | None, criterion: DistillationLoss,
                 optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                 writer: "_CheckpointWriter", context: DistributedContext, device: torch.device, amp: bool,
                 channels_last: bool, checkpoint_every: int, progress: bool):
        # DistributedDataParallel averages gradients over ranks; it is built
        # after a resume has loaded the weights, and broadcasts rank 0's.
        self.trained = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        ) if context.distributed else model
        self.teacher = teacher
        self.criterion = criterion
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.writer = writer
        self.device = device
        self.amp = amp
        self.channels_last = channels_last
        self.checkpoint_every = checkpoint_every
        self.progress = progress and context.is_main

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one optimisation step on a batch; return the loss and the student's logits (B, K)."""
        images, targets = _batch_to(images, targets, self.device, self.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.trained(images)
            teacher_logits = None
            if self.criterion.alpha > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
            loss = self.criterion(logits, targets, teacher_logits)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), logits.detach()

    def train_epoch(self, loader: DataLoader, state: "_TrainingState", *, epoch: int, epochs: int,
                    steps_per_epoch: int) -> torch.Tensor:
        """Train one epoch, from ``state.step_in_epoch`` when resuming it.

        Returns this rank's ``[loss sum, top-1 hits, count]`` over the whole
        epoch, including the steps done before a resume.
        """
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        first_step = state.step_in_epoch if epoch == state.epoch else 0
        if first_step == 0:
            state.meters = [0.0, 0.0, 0.0]
        meters = torch.tensor(state.meters, dtype=torch.float64, device=self.device)

        self.trained.train()
        bar = tqdm(_skip_batches(loader, first_step), total=steps_per_epoch, initial=first_step,
                   desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not self.progress, dynamic_ncols=True)
        for step, (images, targets) in enumerate(bar, start=first_step):
            loss, logits = self.step(images, targets)
            targets = targets.to(self.device, non_blocking=True)
            meters[0] += loss.double() * targets.numel()
            meters[1] += (logits.argmax(dim=1) == targets).sum()
            meters[2] += targets.numel()
            state.global_step += 1

            done = step + 1
            if done % _PROGRESS_EVERY == 0 or done == steps_per_epoch:
                self._check_loss(loss, epoch, done)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.3g}")
            if self.checkpoint_every and done % self.checkpoint_every == 0 and done < steps_per_epoch:
                state.epoch, state.step_in_epoch, state.meters = epoch, done, meters.tolist()
                self.writer.write(state)
        bar.close()
        return meters

    def _check_loss(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        # Under AMP, GradScaler skips a step whose gradients are not finite
        # and lowers its scale, so a non-finite loss does not stop the run.
        value = loss.item()
        if not math.isfinite(value) and not self.amp:
            raise FloatingPointError(
                f"training loss is {value} at epoch {epoch + 1}, step {step}; lower the learning rate"
            )


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             scaler: torch.amp.GradScaler, config: dict[str, Any], context: DistributedContext) -> _TrainingState:
    checkpoint = load_checkpoint(path)
    _check_resume_config(checkpoint.get("config", {}), config, checkpoint["step_in_epoch"], path)

    try:
        model.load_state_dict(checkpoint["model"], strict=True)
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"checkpoint {path} does not match this model ({error}); resume with the same --compressed, "
            "--arch and --num-classes, or choose another --output"
        ) from None
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler.is_enabled() and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])

    state = _TrainingState()
    state.epoch = checkpoint["epoch"]
    state.step_in_epoch = checkpoint["step_in_epoch"]
    state.global_step = checkpoint["global_step"]
    state.best_top1 = checkpoint["best_top1"]
    state.best_epoch = checkpoint["best_epoch"]
    state.history = list(checkpoint["history"])

    ranks = checkpoint["ranks"]
    if len(ranks) == context.world_size:
        saved = ranks[context.rank]
    else:
        # A different number of processes can continue only from an epoch end
        # (checked above), where the meters are zero; RNG states come from rank 0.
        saved = ranks[0]
    restore_rng_state(saved["rng"])
    state.meters = list(saved["meters"])
    logger.info("resumed from %s after %d finished epochs and %d steps of the next", path, state.epoch,
                state.step_in_epoch)
    return state
