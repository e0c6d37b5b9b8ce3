"""Data-parallel training under `torchrun` with PyTorch DistributedDataParallel.

`torchrun --nproc_per_node N -m torchslim run RECIPE` starts N processes; `init()` joins them (gloo on
CPU, nccl on GPU). Every process runs the whole recipe so that training stages step together:

- training wraps the model in DDP and gives each rank its share of every global batch
  (`rank_batches`): the global batch of the single-process run is cut into `world` parts and each
  part's loss is weighted by its share, so the averaged gradient is the global batch's mean gradient
  and the run follows the single-process one (up to float summation order, batch-norm statistics,
  which are per rank, and dropout, whose random draws differ per rank);
- logged losses are reduced across ranks; validation and other evaluations see the same weights and
  data on every rank and agree without communication;
- only rank 0 writes the run directory and measures (latency on a machine shared by N processes would
  be wrong anyway); it broadcasts the measurements. Ranks > 0 work in a private scratch copy of the run
  directory that is removed at the end, so they can read checkpoints on `--resume` and keep their own
  intermediate files without touching the real one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from torchslim.errors import TorchslimError
from torchslim.log import console

T = TypeVar("T")


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def init() -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); True if joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if not dist.is_available():
        raise TorchslimError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    if not is_main():
        console.quiet = True  # one voice: rank 0 logs
    return True


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 only, its result on every rank; an error on rank 0 is raised on every rank
    (instead of leaving the others waiting in the next collective)."""
    if world() == 1:
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except TorchslimError as exc:
            outcome = ("error", exc)
            broadcast(outcome)
            raise
        except Exception as exc:
            broadcast(("error", TorchslimError(f"rank 0 failed: {type(exc).__name__}: {exc}")))
            raise
    kind, value = broadcast(outcome)
    if kind == "error":
        raise value
    return value


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` when running under torchrun, else `model` itself."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (module paths and attributes are its)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_batches(n: int, batch_size: int, generator: torch.Generator) -> list[tuple[list[int], float]]:
    """This rank's part of every global batch of the shuffled order the single-process run uses, with
    the weight that makes the mean over ranks of (weight x part mean) the global batch mean. A rank
    left without a sample (a last batch smaller than the world) gets one sample at weight 0."""
    r, w = rank(), world()
    out = []
    for batch in DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=generator):
        part = batch.tensor_split(w)[r] if w > 1 else batch
        out.append((part.tolist(), len(part) * w / len(batch)) if len(part) else (batch[:1].tolist(), 0.0))
    return out


@contextlib.contextmanager
def rank_dir(run_dir: Path, prepare: Callable[[], T]) -> Iterator[tuple[Path, T]]:
    """Rank 0: `prepare()` checks and readies `run_dir` (its error is every rank's). Ranks > 0: a
    scratch copy of the readied `run_dir`, removed on exit. Yields (directory, prepare's result)."""
    if world() == 1:
        yield run_dir, prepare()
        return
    state = on_main(prepare)
    if is_main():
        yield run_dir, state
        barrier()
        return
    if not run_dir.is_dir():
        raise TorchslimError(
            f"rank {rank()} cannot see the run directory {run_dir} that rank 0 prepared: on "
            "several machines, put --out on storage every machine mounts at the same path."
        )
    scratch = Path(tempfile.mkdtemp(prefix=f"torchslim-rank{rank()}-"))
    try:
        shutil.copytree(run_dir, scratch, dirs_exist_ok=True)
        yield scratch, state
        barrier()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


__all__ = [
    "init",
    "finish",
    "world",
    "rank",
    "is_main",
    "barrier",
    "broadcast",
    "on_main",
    "all_reduce_sum",
    "wrap",
    "unwrap",
    "rank_batches",
    "rank_dir",
]
