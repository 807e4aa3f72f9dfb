"""Where the computation runs: the device, the ranks of a torchrun job, precision and seeding.

Shared by training (training.train.run), the loader benchmark (training.throughput) and `evaluate`, so that
`--device` and `--amp` mean the same, and are refused the same way, everywhere.
"""
from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
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


@dataclass(frozen=True)
class Precision:
    """The precision a run computes in, and why: `amp` is "bf16", "fp16" or None (float32);
    `reason` is the line the run's banner, gpu_check and bench_train show, e.g.
    "fp16 + loss scaling: NVIDIA GeForce RTX 2060, sm_75, has no native bf16"."""
    amp: str | None
    reason: str

    @property
    def loss_scaling(self) -> bool:
        """fp16 needs a GradScaler (its range underflows small gradients); bf16 and float32 not."""
        return self.amp == "fp16"


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of this very device (not of the current one)."""
    return tuple(torch.cuda.get_device_capability(device))


def capability_name(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8.0 (Ampere) and later, or ROCm.

    Not `torch.cuda.is_bf16_supported()`: its default (including_emulation=True) says True on
    a Turing card, where cuDNN has no bf16 convolutions and every one runs a slow fallback,
    and it asks about the current device, not this one."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    return cuda_capability(device) >= (8, 0)


def _card(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)}, {capability_name(cuda_capability(device))}"


_LABELS = {"bf16": "bf16", "fp16": "fp16 + loss scaling", None: "float32"}


def choose_precision(amp: str | None, device: torch.device) -> Precision:
    """--amp as what the run computes in, and why; refuses what the device cannot do well.

    auto: bf16 where the device has it natively (CUDA compute capability >= 8.0), fp16 with a
    GradScaler on 7.x (Volta, Turing: tensor cores, no bf16), float32 below 7.0 (no tensor
    cores: fp16 would save memory, not time) and on the CPU. An explicit bf16 on a CUDA card
    without native bf16 is refused (--amp fp16 or auto instead); an explicit fp16 below 7.0 is
    allowed; fp16 on the CPU is refused (emulated, ~100x slower than float32)."""
    if amp is not None and amp != "auto" and amp not in AMP_DTYPES:
        raise UserError(f"--amp: {amp!r} is not one of: auto, {', '.join(AMP_DTYPES)}, none")
    if device.type != "cuda":
        if amp == "fp16":
            # torch runs it, but emulated: ~100x slower than float32 (a tiny Unet, 2-core test box)
            raise UserError("--amp fp16 needs a CUDA device (on the CPU it is emulated and far "
                            "slower than float32); use --amp bf16 or leave --amp out")
        amp = None if amp == "auto" else amp
        where = "on the CPU" if device.type == "cpu" else f"on {device}"
        return Precision(amp, f"{_LABELS[amp]} {where}")
    major, minor = cuda_capability(device)
    bf16 = native_bf16(device)
    if amp == "auto":
        amp = "bf16" if bf16 else "fp16" if major >= 7 else None
    if amp == "bf16" and not bf16:
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} (compute capability "
                        f"{major}.{minor}) has no native bf16, Ampere (8.0) and later do; use "
                        "--amp fp16 (or auto)")
    reason = f"{_LABELS[amp]}: {_card(device)}"
    if major < 7:
        reason += ", has no tensor cores" + ("" if amp is None else ": it saves memory, not time")
    elif amp == "fp16" and not bf16:
        reason += ", has no native bf16"
    return Precision(amp, reason)


def resolve_amp(amp: str | None, device: torch.device) -> str | None:
    """--amp as the run's precision: "bf16", "fp16" or None (float32); see choose_precision."""
    return choose_precision(amp, device).amp


def describe_precision(device: torch.device | str, amp: str | None = "auto") -> dict:
    """What --amp (auto by default) means on `device`, for scripts/gpu_check.py and
    scripts/bench_train.py: name, capability ("sm_75", None on the CPU), native_bf16, amp
    ("bf16", "fp16" or None for float32), loss_scaling and reason. An amp the device refuses
    gives amp None and the refusal as reason."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    info = {"device": str(device),
            "name": torch.cuda.get_device_name(device) if cuda else device.type,
            "capability": capability_name(cuda_capability(device)) if cuda else None,
            "native_bf16": native_bf16(device)}
    try:
        precision = choose_precision(amp, device)
    except UserError as error:
        return {**info, "amp": None, "loss_scaling": False, "reason": str(error)}
    return {**info, "amp": precision.amp, "loss_scaling": precision.loss_scaling,
            "reason": precision.reason}


def resolve_channels_last(channels_last: bool | None, device: torch.device) -> bool:
    """channels_last by default on CUDA (tensor cores want NHWC; both loaders hand it for
    free), contiguous NCHW on the CPU."""
    return device.type == "cuda" if channels_last is None else bool(channels_last)


def autocast_context(amp: str | None, device: torch.device):
    """Autocast for --amp (None: float32), refusing what the device cannot do well."""
    amp = choose_precision(amp, device).amp
    if amp is None:
        return nullcontext()
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
