"""The model factory: any segmentation_models_pytorch architecture by name, offline-safe.

smp downloads ImageNet encoder weights from the Hugging Face hub (timm `tu-` encoders too) on
first use. Without network huggingface_hub retries each request five times with exponential
backoff (about 25 s) and then fails with a generic message. So before building a model that
wants weights we probe the hub with one short TCP connect; if it cannot be reached, the build
runs in the hub's offline mode (weights already in the local cache still load; missing ones
fail at once), and the failure becomes a UserError that names the cause and the way out
(`--encoder-weights none`).
"""
from __future__ import annotations

import copy
import difflib
import inspect
import os
import socket
import threading
from contextlib import contextmanager, nullcontext
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import segmentation_models_pytorch as smp
import torch
from huggingface_hub import constants
from torch import nn
from torch.nn import SyncBatchNorm

from cache.errors import UserError

# Spellings people use for smp's architecture names (smp's own keys are the lowercase class names).
ARCH_ALIASES = {"unet++": "unetplusplus", "deeplabv3+": "deeplabv3plus", "deeplab": "deeplabv3plus"}

HUB_PROBE_TIMEOUT_S = 2.0   # a reachable hub answers a TCP connect in well under a second

# Modules whose exceptions mean "could not fetch the weights" (the hub, HTTP clients, urllib).
_DOWNLOAD_ERROR_MODULES = ("huggingface_hub", "httpx", "httpx2", "requests", "urllib3", "urllib")


def architectures() -> dict[str, type]:
    return dict(smp.MODEL_ARCHITECTURES_MAPPING)


def canonical_arch(arch: str) -> str:
    """Case-insensitive smp name ('DeepLabV3Plus', 'unet++' ...) -> smp's key."""
    key = str(arch).strip().lower().replace("_", "").replace("-", "")
    key = ARCH_ALIASES.get(key, key)
    known = architectures()
    if key not in known:
        names = ", ".join(cls.__name__ for cls in known.values())
        raise UserError(f"--arch {arch!r}: unknown architecture; choose one of: {names}")
    return key


def _is_download_error(exc: BaseException) -> bool:
    for error in (exc, exc.__cause__, exc.__context__):
        if error is None:
            continue
        module = type(error).__module__.split(".")[0]
        if module in _DOWNLOAD_ERROR_MODULES or isinstance(error, (OSError, ConnectionError)):
            return True
    return False


def _download_error(encoder: str, weights: str, exc: BaseException, cause: str) -> UserError:
    detail = str(exc).splitlines()[0].split(". ")[0][:160] if str(exc) else "no detail"
    return UserError(
        f"--encoder-weights {weights}: cannot get the {weights} weights of encoder {encoder!r} "
        f"({cause} and they are not cached under {constants.HF_HUB_CACHE}: {type(exc).__name__}: {detail}); "
        "train from scratch with --encoder-weights none, or fetch them once with network access")


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the Hugging Face hub (or the proxy in front of it) accepts a TCP connection
    within `timeout` seconds, else why not ("HF_HUB_OFFLINE is set", "cannot reach
    huggingface.co:443 (...)"). The lookup and connect run in a daemon thread, because a
    hanging DNS lookup ignores socket timeouts."""
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    host, port = _first_hop(constants.ENDPOINT)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    if outcome and outcome[0] is None:
        return None
    why = outcome[0] if outcome else f"no answer within {timeout:g} s"
    return f"cannot reach {host}:{port} ({why})"


def _first_hop(endpoint: str) -> tuple[str, int]:
    """(host, port) a request to `endpoint` connects to first: the proxy that the environment
    names for it (HTTPS_PROXY, ALL_PROXY ... as huggingface_hub's HTTP client reads them),
    else the endpoint itself."""
    url = urlsplit(endpoint)
    proxies = getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    default_port = {"https": 443, "http": 80}.get(url.scheme, 1080)    # 1080: socks
    return url.hostname or "", url.port or default_port


@contextmanager
def hub_offline():
    """The hub's own offline mode for the duration: cached files load, nothing is requested.
    huggingface_hub reads HF_HUB_OFFLINE once at import; is_offline_mode() reads this copy."""
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def check_model_args(key: str, encoder: str, kw: dict) -> None:
    """Refuse --model-arg keys the architecture does not name: smp passes unknown keys on to
    the encoder, where most encoders drop them without a word (a typo would train the wrong
    model). timm encoders (tu-...) take their own keys, so those pass."""
    if encoder.startswith("tu-"):
        return
    cls = architectures()[key]
    known = [name for name, param in inspect.signature(cls.__init__).parameters.items()
             if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)]
    for name in kw:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"--model-arg {name}: {cls.__name__} has no such argument{hint}; "
                            f"it takes: {', '.join(k for k in known if k not in RESERVED_ARGS)}")


# Arguments the command line sets itself (--encoder, --encoder-weights, the cache's classes).
RESERVED_ARGS = ("encoder_name", "encoder_weights", "in_channels", "classes")


def build_model(arch: str, encoder: str, num_classes: int, encoder_weights: str | None = None,
                **kw) -> nn.Module:
    """smp.create_model with our error handling. `kw` goes to the architecture (e.g.
    encoder_depth=3, decoder_channels=(32, 16, 8) for a tiny Unet)."""
    key = canonical_arch(arch)
    check_model_args(key, encoder, kw)
    if isinstance(encoder_weights, str) and encoder_weights.strip().lower() in ("none", ""):
        encoder_weights = None
    requested = encoder_weights
    if encoder.startswith("tu-") and encoder_weights is not None:
        encoder_weights = True  # timm encoders take a flag; the tag lives in the encoder name
    offline = hub_unreachable_reason() if encoder_weights is not None else None
    try:
        with hub_offline() if offline else nullcontext():
            return smp.create_model(key, encoder_name=encoder, encoder_weights=encoder_weights,
                                    in_channels=3, classes=int(num_classes), **kw)
    except UserError:
        raise
    except KeyError as exc:
        # smp: "Wrong encoder name ..." or "Wrong pretrained weights ..."
        message = str(exc.args[0]) if exc.args else str(exc)
        if "pretrained weights" in message:
            raise UserError(f"--encoder-weights {requested}: not available for encoder "
                            f"{encoder!r} ({message[:200]})") from None
        raise UserError(f"--encoder {encoder!r}: unknown encoder; see the encoder table of "
                        "segmentation_models_pytorch (e.g. resnet50, efficientnet-b4, "
                        "tu-convnext_tiny)") from None
    except Exception as exc:
        if encoder_weights is not None and _is_download_error(exc):
            raise _download_error(encoder, str(requested), exc, offline or "no network") from None
        if isinstance(exc, (ValueError, TypeError, AssertionError, RuntimeError)):
            raise UserError(f"--arch {arch} --encoder {encoder}: smp cannot build this model "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        raise


def input_divisor(model: nn.Module) -> int:
    """The multiple that input height and width must have (1 when the model does not say)."""
    while isinstance(getattr(model, "module", None) or getattr(model, "_orig_mod", None), nn.Module):
        model = getattr(model, "module", None) or model._orig_mod     # DDP, torch.compile wrappers
    encoder = getattr(model, "encoder", None)
    stride = getattr(encoder, "output_stride", None)
    return int(stride) if isinstance(stride, int) and stride > 0 else 1


def nearest_multiple(size: int, divisor: int) -> int:
    """The multiple of `divisor` closest to `size` (ties go up; never below `divisor`)."""
    return max(divisor, (size + divisor // 2) // divisor * divisor)


def check_input_size(model: nn.Module, input_hw: tuple[int, int]) -> None:
    """Refuse a training crop the model cannot take: most smp models raise a RuntimeError
    mid-forward unless height and width are multiples of the encoder's output stride."""
    if not getattr(model, "requires_divisible_input_shape", True):
        return                        # e.g. Unet, which resizes its skip connections
    divisor = input_divisor(model)
    h, w = input_hw
    if h % divisor or w % divisor:
        def res(height: int, width: int) -> str:
            return str(height) if height == width else f"{height}x{width}"

        nearest = res(nearest_multiple(h, divisor), nearest_multiple(w, divisor))
        up = res(-(-h // divisor) * divisor, -(-w // divisor) * divisor)
        also = f" (or --res {up})" if up != nearest else ""
        raise UserError(f"--res {res(h, w)}: {type(model).__name__} needs a height and width "
                        f"divisible by {divisor}; try --res {nearest}{also}")


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    return SyncBatchNorm.convert_sync_batchnorm(model)


def freeze_unused_parameters(model: nn.Module, input_hw: tuple[int, int]) -> list[str]:
    """Freeze the parameters a training forward pass never reaches; returns their names.

    smp keeps the deeper encoder stages when encoder_depth < 5 but never runs them. DDP
    refuses parameters without gradients unless it searches the graph for them every step
    (find_unused_parameters); freezing them once is free. Done for every run, so that the
    optimiser holds the same parameters whatever the world size (checkpoints stay portable).
    The probe runs on a copy, so the model's BatchNorm statistics and the RNG are untouched.
    """
    probe = copy.deepcopy(model).train()
    device = next(probe.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = probe(torch.zeros(2, 3, *input_hw, device=device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().mean().backward()
    unused = [name for name, p in probe.named_parameters() if p.requires_grad and p.grad is None]
    for name, param in model.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    return unused
