"""THE training loop. Fine-tuning, distillation and quantization-aware training all run through `fit`.

A loss is any callable `loss_fn(model, batch) -> (loss, {"part": value, ...})`; everything else
(optimiser, schedule, accumulation, mixed precision, activation checkpointing, clipping, early
stopping, checkpoint/resume, progress, history) lives here once.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

from torchslim import distributed
from torchslim.errors import TorchslimError
from torchslim.io import replacing
from torchslim.log import WARNINGS, collect_warnings, console, progress_bar, warn  # noqa: F401  (re-exported)

LossFn = Callable[[nn.Module, tuple], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patience: int = Field(2, ge=1, description="epochs without improvement before stopping")
    min_delta: float = Field(
        0.0, ge=0, description="smallest rise of the validation metric that counts as an improvement"
    )


class TrainConfig(BaseModel):
    """Settings of one training run; the `train` stage's recipe keys."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=1, le=10000, description="passes over the training split")
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate (the schedule decays it)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with `momentum`")
    weight_decay: float = Field(1e-4, ge=0, description="decoupled weight decay (AdamW) or L2 (SGD)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="cosine: per step, down to zero; step: times `gamma` every `step_size` epochs"
    )
    step_size: int = Field(1, ge=1, description="epochs between decays for the step schedule")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor for the step schedule")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="an optimiser step every this many batches")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="auto: bf16 where the hardware computes it natively, else fp32"
    )
    activation_checkpointing: Union[bool, list[str]] = Field(
        False, description="true for every top-level child, or a list of module paths"
    )
    grad_clip: Optional[float] = Field(None, gt=0, description="max gradient norm")
    early_stopping: Optional[EarlyStopping] = Field(None, description="stop when the validation metric stops improving")
    restore_best: bool = Field(True, description="end with the weights of the best validation epoch")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing (tasks with labels)")
    batch_size: Optional[int] = Field(None, ge=1, description="overrides data.batch_size for this stage")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    stopped_early: bool = False
    precision: str = "fp32"  # what actually ran (after resolving "auto")


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(model: nn.Module, batch: tuple):
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        return loss, {"ce": loss}

    return loss_fn


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of one epoch, so a resumed run sees exactly the same batches."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> DataLoader:
    """The epoch's global batches in one process, shuffled by `epoch_generator`."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=epoch_generator(seed, epoch), drop_last=False
    )


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TorchslimError("The model has no trainable parameters; nothing to train.")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Stepped after every optimiser step: cosine decays to zero over the whole run, step decays
    by `gamma` every `step_size` epochs."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.schedule == "cosine":
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif cfg.schedule == "step":
        factor = lambda step: cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def native_bf16(device: torch.device) -> bool:
    """True when bf16 matmuls/convolutions run in hardware (AVX-512 BF16 or AMX on CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise TorchslimError("precision 'fp16' needs a CUDA device; on CPU use 'bf16' or 'fp32'.")
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, paths: bool | list[str]):
    """Recompute the named modules' activations in backward instead of storing them.

    Patches the instances' forward for the duration only, so state-dict keys and export are untouched."""
    if not paths:
        yield
        return
    names = [n for n, _ in model.named_children()] if paths is True else list(paths)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise TorchslimError(
            f"activation_checkpointing: no module named {missing}; "
            f"top-level modules are {[n for n, _ in model.named_children()]}."
        )
    patched = []
    for name in names:
        module = modules[name]
        original = module.forward
        module.forward = functools.partial(checkpoint, original, use_reentrant=False)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # drop the instance attribute; the class's forward is back


def _atomic_save(obj, path: Path) -> None:
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def fit(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    *,
    loss_fn: LossFn,
    batch_size: int,
    validate: Callable[[nn.Module], float] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_epoch_end: Callable[[int, dict], None] | None = None,
    epoch_setup: Callable[[nn.Module, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
    description: str = "train",
) -> TrainResult:
    """Train `model` in place. With `checkpoint_dir`, a checkpoint is written after every epoch and
    `resume=True` continues from it, giving the same weights as an uninterrupted run. `epoch_setup(model,
    epoch)` runs after the model is put in training mode each epoch (e.g. to freeze batch norm); `stop()`
    true after an epoch ends training there (a time budget; recorded like an early stop). Under
    torchrun the model trains wrapped in DistributedDataParallel on this rank's share of every global
    batch (`distributed.rank_batches`), and only rank 0 writes checkpoints."""
    device = torch.device(device)
    cfg = cfg.model_copy(update={"precision": resolve_precision(cfg.precision, device)})
    model.to(device)
    main = distributed.is_main()
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg, math.ceil(math.ceil(len(train_set) / batch_size) / cfg.grad_accum_steps))
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    result, start_epoch, best_state, bad_epochs = TrainResult(), 0, None, 0
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if resume and ckpt_path and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        result = TrainResult(state["history"], state["best_epoch"], state["best_metric"], state["stopped_early"])
        best_state, bad_epochs, start_epoch = state["best_state"], state["bad_epochs"], state["epoch"] + 1
        console.log(f"{description}: resumed after epoch {start_epoch} from {ckpt_path}")
    else:
        torch.manual_seed(seed)
    result.precision = cfg.precision
    finished = result.stopped_early or start_epoch >= cfg.epochs
    # under torchrun: DDP syncs the gradients; after the resume above, every rank holds the same state
    trained = distributed.wrap(model, device)
    with activation_checkpointing(model, cfg.activation_checkpointing), progress_bar() as progress:
        for epoch in range(start_epoch, 0 if finished else cfg.epochs):
            batches = distributed.rank_batches(len(train_set), batch_size, epoch_generator(seed, epoch))
            loader = DataLoader(train_set, batch_sampler=[b for b, _ in batches])
            task = progress.add_task(f"{description} {epoch + 1}/{cfg.epochs}", total=len(loader))
            lr = opt.param_groups[0]["lr"]
            trained.train()
            if epoch_setup is not None:
                epoch_setup(model, epoch)
            parts = _train_epoch(
                trained,
                loader,
                [w for _, w in batches],
                opt,
                sched,
                scaler,
                cfg,
                loss_fn,
                device,
                lambda: progress.advance(task),
            )
            record = {"epoch": epoch + 1, "lr": lr, **parts}
            if validate is not None:
                record["val_metric"] = float(validate(model))
                improved = result.best_metric is None or record["val_metric"] > result.best_metric + (
                    cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
                )
                if improved:
                    result.best_metric, result.best_epoch, bad_epochs = record["val_metric"], epoch + 1, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad_epochs += 1
                if cfg.early_stopping and bad_epochs >= cfg.early_stopping.patience:
                    result.stopped_early = True
            if stop is not None and epoch + 1 < cfg.epochs and stop():
                result.stopped_early = record["stopped"] = True
            result.history.append(record)
            console.log(
                f"{description} epoch {epoch + 1}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
            )
            if ckpt_path and main:
                ckpt_path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_save(
                    {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": _rng_state(),
                        "history": result.history,
                        "best_epoch": result.best_epoch,
                        "best_metric": result.best_metric,
                        "stopped_early": result.stopped_early,
                        "best_state": best_state,
                        "bad_epochs": bad_epochs,
                    },
                    ckpt_path,
                )
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            if result.stopped_early:
                why = "the time budget is spent" if record.get("stopped") else "early stop"
                console.log(
                    f"{description}: {why} after epoch {epoch + 1} "
                    f"(best val {result.best_metric:.4f} at epoch {result.best_epoch})"
                )
                break
    if cfg.restore_best and best_state is not None:
        model.load_state_dict(best_state)
    return result


def _train_epoch(
    model, loader, weights: list[float], opt, sched, scaler, cfg: TrainConfig, loss_fn: LossFn, device, advance
) -> dict:
    """One epoch; `weights[i]` scales batch i's loss (1 in one process; this rank's share of the global
    batch under torchrun, where the logged values are reduced across ranks)."""
    sums: dict[str, float] = {}
    steps, world = 0, distributed.world()
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        batch = tuple(t.to(device) for t in batch)
        with _autocast(cfg.precision, device):
            loss, parts = loss_fn(model, batch)
        names = list(parts)
        logged = (
            torch.stack(
                [loss.detach().float()] + [torch.as_tensor(parts[k]).detach().float().to(loss.device) for k in names]
            )
            * weights[i]
        )
        logged = distributed.all_reduce_sum(logged).cpu() / world  # on the loss device: gloo CPU, nccl CUDA
        if not torch.isfinite(logged[0]):
            raise TorchslimError(
                f"The loss became {logged[0].item()} at step {i + 1} of this epoch; lower the "
                "learning rate or enable grad_clip. The last epoch checkpoint is kept."
            )
        scaler.scale(loss * weights[i] / cfg.grad_accum_steps).backward()
        if (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == len(loader):
            if cfg.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
        for name, value in zip(["loss"] + [f"loss_{k}" for k in names], logged.tolist()):
            sums[name] = sums.get(name, 0.0) + value
        steps += 1
        advance()
    return {k: v / max(steps, 1) for k, v in sums.items()}


def evaluate_accuracy(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu"
) -> float:
    """Top-1 accuracy of a PyTorch model (used for validation inside training)."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            total += len(y)
    return correct / max(total, 1)


__all__ = [
    "TrainConfig",
    "TrainResult",
    "EarlyStopping",
    "fit",
    "cross_entropy_loss",
    "epoch_loader",
    "evaluate_accuracy",
    "activation_checkpointing",
]
