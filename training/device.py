"""Where the computation runs: the device, the ranks of a torchrun job, precision and seeding.

Shared by training (training.run), the loader benchmark (training.bench) and `evaluate`, so that
`--device` and `--amp` mean the same, and are refused the same way, everywhere.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cache.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str | torch.device | None, local_rank: int = 0, *,
                   under_torchrun: bool = False) -> torch.device:
    """--device as a torch.device (None: cuda if available); a bare "cuda" is this rank's GPU.

    Under torchrun LOCAL_RANK picks the GPU whatever index was asked for: an explicit
    `--device cuda:0` would otherwise put every rank on GPU 0 (NCCL refuses duplicate GPUs).
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {requested!r}: not a torch device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine")
        if device.index is None or under_torchrun:
            # modulo: a launcher that shows each rank only its own GPU(s) (per-task
            # CUDA_VISIBLE_DEVICES) leaves LOCAL_RANK beyond the visible count
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                            "CUDA device(s)")
    return device


def use_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device, so that every stream, event and side
    thread (DALI's, the pin-memory thread) opens its context there and not on GPU 0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def init_distributed(requested_device: str | None) -> DistEnv:
    """Single process, or one rank of a torchrun job (env:// rendezvous; gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank, under_torchrun=world_size > 1)
    use_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://")
    return DistEnv(rank, world_size, local_rank, device)


def single_process(requested_device: str | torch.device | None) -> DistEnv:
    device = resolve_device(requested_device)
    use_device(device)
    return DistEnv(0, 1, 0, device)


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA backward kernels (bilinear upsampling) have no deterministic
        # version; on the CPU everything used here is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def resolve_amp(amp: str | None, device: torch.device) -> str | None:
    """--amp auto: bf16 on a GPU that supports it, fp16 (with a GradScaler) on an older GPU,
    float32 (None) on the CPU. Anything else is returned as asked."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return None
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_channels_last(channels_last: bool | None, device: torch.device) -> bool:
    """channels_last by default on CUDA (tensor cores want NHWC; both loaders hand it for
    free), contiguous NCHW on the CPU."""
    return device.type == "cuda" if channels_last is None else bool(channels_last)


def autocast_context(amp: str | None, device: torch.device):
    """Autocast for --amp (None: float32), refusing what the device cannot do well."""
    amp = resolve_amp(amp, device)
    if amp is None:
        return nullcontext()
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp: {amp!r} is not one of: {', '.join(AMP_DTYPES)}, none")
    if device.type == "cpu" and amp == "fp16":
        # torch runs it, but emulated: ~100x slower than float32 (a tiny Unet, 2-core test box)
        raise UserError("--amp fp16 needs a CUDA device (on the CPU it is emulated and far "
                        "slower than float32); use --amp bf16 or leave --amp out")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                        "use --amp fp16")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings would otherwise measure the launches only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (DDP averages gradients, not buffers)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)
