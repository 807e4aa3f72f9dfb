"""The training configuration: one dataclass, filled from defaults, a config file and flags.

Precedence, lowest first: the dataclass defaults; on `--resume`, the config saved in the run
dir; the `--config FILE` (YAML or JSON, keys are the option names with `_` or `-`); the
command-line flags the user actually typed. The resolved config is saved in the run dir as
config.yaml (config.json where PyYAML is missing) so that a run can be repeated or resumed.

Every value goes through the same parser whether it comes from a file or a flag, so
`res: 512x1024` in a file and `--res 512x1024` mean the same thing.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

try:
    import yaml
except ImportError:   # a bare environment: the run's config is saved as config.json
    yaml = None

from cache.errors import UserError
from cache.location import resolve_cache
from loaders.contract import LOADER_KINDS
from training.core.losses import parse_loss_spec
from training.outputs.folder import check_output_dir
from training.train.option_values import (_auto, _bool, _choice, _encoder_weights, _float, _int,
                                          _model_kwargs, _optional, _res, _scale, _str)
from training.train.tensorboard import require_tensorboard

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine")
AMP_MODES = ("auto", "bf16", "fp16")
# Options whose "off" value is None internally and the word "none" in files and flags: a saved
# config.yaml then reads "amp: none", never a null that could mean "the default".
NONE_WORDS = ("amp", "class_weights", "encoder_weights")
CONFIG_NAMES = ("config.yaml", "config.json")

# Per-optimiser defaults for --lr and --weight-decay (torchvision's segmentation reference for
# SGD; the usual AdamW setting for fine-tuning an ImageNet encoder).
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-4}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 1e-2}
DEFAULT_EPOCHS = 100


@dataclass(frozen=True)
class TrainConfig:
    cache: str | None = None
    out: str = "runs/train"
    loader: str = "dali"
    train_split: str = "train"
    val_split: str = "val"
    arch: str = "deeplabv3plus"
    encoder: str = "resnet50"
    encoder_weights: str | None = "imagenet"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int | None = None          # neither epochs nor iters: DEFAULT_EPOCHS
    iters: int | None = None           # optimiser steps
    batch_size: int = 8                # per rank, per micro-batch
    val_batch_size: int | None = None  # None (auto): 1 on the CPU, on CUDA what fits (training.core.memory)
    grad_accum: int = 1
    lr: float | None = None            # None: DEFAULT_LR[optimizer]
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY[optimizer]
    momentum: float = 0.9
    optimizer: str = "sgd"
    schedule: str = "poly"
    poly_power: float = 0.9
    warmup: int = 0                    # optimiser steps of linear warm-up
    loss: str = "ce"
    class_weights: str | None = "auto"  # "PATH/stats.json[:method]"; auto: the cache's stats.json, enet
    amp: str | None = "auto"           # auto: bf16 (fp16 on older GPUs) on CUDA, float32 on the CPU
    channels_last: bool | None = None  # None: on for CUDA, off on the CPU
    eval_every: int | None = None      # optimiser steps; None: at the end of every epoch
    log_every: int = 10
    checkpoint_every: int | None = None  # optimiser steps; besides every eval and epoch end
    res: tuple[int, int] = (640, 640)
    scale: tuple[float, float] = (0.5, 2.0)
    eval_scale: float = 1.0
    flip_prob: float = 0.5
    jitter: bool = True
    cat_max_ratio: float | None = None
    workers: int | None = None
    device: str | None = None          # None: cuda if available, else cpu
    seed: int = 0
    limit: int | None = None           # smoke: steps per epoch and validation frames
    sync_bn: bool = False
    deterministic: bool = False
    plots: bool = True
    init_from: str | None = None       # a checkpoint whose weights (only) start the run
    folds: int | None = None           # k-fold cross-validation over the train split ...
    fold: int | None = None            # ... validating on this fold (0-based)
    tensorboard: bool = False          # also TensorBoard event files in RUN/tb

    @property
    def resolved_epochs(self) -> int | None:
        if self.epochs is None and self.iters is None:
            return DEFAULT_EPOCHS
        return self.epochs

    @property
    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def resolved_weight_decay(self) -> float:
        return DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay

    def to_dict(self) -> dict:
        """Plain JSON/YAML types only (tuples become lists; "off" is the word none)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
            if key in NONE_WORDS and value is None:
                out[key] = "none"
            if key == "workers" and value is None:
                out[key] = "auto"   # per machine and rank: a resume elsewhere decides anew
            if key == "val_batch_size" and value is None:
                out[key] = "auto"   # resolve_defaults writes the number a run chose
        return out


# -- value parsers: (value, option name) -> value, raising UserError with the option's name ----


PARSERS: dict[str, Callable] = {
    "cache": _optional(_str), "out": _str, "loader": _choice(LOADER_KINDS),
    "train_split": _str, "val_split": _str, "arch": _str, "encoder": _str,
    "encoder_weights": _encoder_weights, "model_kwargs": _model_kwargs,
    "epochs": _optional(_int(1)), "iters": _optional(_int(1)), "batch_size": _int(1),
    "val_batch_size": _auto(_int(1)), "grad_accum": _int(1), "lr": _optional(_float(0.0, strict=True)),
    "weight_decay": _optional(_float(0.0)), "momentum": _float(0.0),
    "optimizer": _choice(OPTIMIZERS), "schedule": _choice(SCHEDULES),
    "poly_power": _float(0.0, strict=True), "warmup": _int(0), "loss": _str,
    "class_weights": _optional(_str), "amp": _choice(AMP_MODES, none_word="none"),
    "channels_last": _optional(_bool),
    "eval_every": _optional(_int(1)), "log_every": _int(1), "checkpoint_every": _optional(_int(1)),
    "res": _res, "scale": _scale, "eval_scale": _float(0.0, strict=True),
    "flip_prob": _float(0.0), "jitter": _bool, "cat_max_ratio": _optional(_float(0.0, strict=True)),
    "workers": _auto(_int(0)), "device": _optional(_str), "seed": _int(0),
    "limit": _optional(_int(1)), "sync_bn": _bool, "deterministic": _bool, "plots": _bool,
    "tensorboard": _bool,
    "init_from": _optional(_str), "folds": _optional(_int(2)), "fold": _optional(_int(0)),
}
assert set(PARSERS) == {f.name for f in fields(TrainConfig)}, "every option needs a parser"


def parse_values(values: dict, source: str) -> dict:
    """Parse raw option values (from a file or flags); unknown keys are refused by name."""
    parsed = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in PARSERS:
            close = difflib.get_close_matches(key, PARSERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{source}: unknown option {raw_key!r}{hint}")
        parsed[key] = PARSERS[key](value, key)
    return parsed


def read_config_file(path: str | os.PathLike) -> dict:
    """Raw values of a YAML (.yaml/.yml) or JSON file; a mapping at the top level."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"--config {path}: use a .yaml, .yml or .json file")
    except UserError:
        raise
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise UserError(f"--config {path}: cannot parse ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: the top level must be a mapping of option: value")
    return data


def saved_config_path(run_dir: str | os.PathLike) -> Path | None:
    for name in CONFIG_NAMES:
        path = Path(run_dir) / name
        if path.is_file():
            return path
    return None


def resolve_config(flags: dict, config_file: str | None = None, *, resume: bool = False,
                   notes: list[str] | None = None) -> TrainConfig:
    """Defaults < saved run config (on resume) < config file < flags (None means 'not given').
    A cache given nowhere is the default place (cache.location); `notes` gets a line saying so."""
    flags = {k: v for k, v in flags.items() if v is not None}
    values: dict = {}
    file_values = parse_values(read_config_file(config_file), f"--config {config_file}") \
        if config_file else {}
    if resume:
        out = flags.get("out", file_values.get("out", TrainConfig.out))
        # a folder that is not a run of ours is refused before its config.yaml is read
        check_output_dir(out, "run", option="--out", command="train", legacy=("last.pt",))
        saved = saved_config_path(out)
        if saved is not None:
            values.update(parse_values(read_config_file(saved), str(saved)))
        elif "cache" not in flags and "cache" not in file_values:
            raise UserError(f"--resume: no run to resume in --out {out} (no "
                            f"{' or '.join(CONFIG_NAMES)}); check --out, or give --cache to start it")
    given = parse_values(flags, "command line")
    # --iters or --epochs over a saved run or a file replaces the other one there (a finished
    # run is extended with either)
    for later, earlier in ((file_values, [values]), (given, [values, file_values])):
        for one, other in (("iters", "epochs"), ("epochs", "iters")):
            if later.get(one) is not None and other not in later:
                for source in earlier:
                    source.pop(other, None)
    values.update(file_values)
    if "model_kwargs" in given:    # --model-arg sets single keys of the file's model_kwargs
        given["model_kwargs"] = {**values.get("model_kwargs", {}), **given["model_kwargs"]}
    values.update(given)
    if values.get("cache") is None:
        found = resolve_cache(None, must_exist=True)
        values["cache"] = str(found.path)
        if notes is not None:
            notes.append(found.describe("cache"))
    return validate(TrainConfig(**values))


def parse_model_args(pairs) -> dict:
    """("encoder_depth=3", "decoder_channels=[32,16,8]") -> {"encoder_depth": 3, ...};
    values are read as YAML scalars/lists (numbers, true/false, null, [a, b])."""
    kwargs = {}
    for pair in pairs:
        key, sep, text = str(pair).partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"--model-arg {pair!r}: expected KEY=VALUE, e.g. encoder_depth=3")
        try:
            kwargs[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"--model-arg {pair!r}: cannot read the value {text!r}") from None
    return kwargs


def validate(config: TrainConfig) -> TrainConfig:
    """Checks that involve more than one option."""
    if config.epochs is not None and config.iters is not None:
        raise UserError("give --epochs or --iters, not both")
    if config.warmup and config.iters is not None and config.warmup >= config.iters:
        raise UserError(f"--warmup {config.warmup} must be smaller than --iters {config.iters}")
    if not 0.0 <= config.flip_prob <= 1.0:
        raise UserError(f"--flip-prob must be in [0, 1], got {config.flip_prob}")
    parse_loss_spec(config.loss)
    if (config.folds is None) != (config.fold is None):
        raise UserError("give --folds K and --fold I together (cross-validation fold I of K)")
    if config.folds is not None and config.fold >= config.folds:
        raise UserError(f"--fold {config.fold}: must be between 0 and {config.folds - 1} "
                        f"for --folds {config.folds}")
    if config.tensorboard:
        require_tensorboard()
    return config


def save_config(config: TrainConfig, run_dir: str | os.PathLike,
                notes: list[str] = ()) -> Path:
    """Write the resolved config into the run dir (YAML where PyYAML is installed), atomically;
    `notes` become trailing comments (what "auto" resolved to on this machine)."""
    data = config.to_dict()
    if yaml is not None:
        path, text = Path(run_dir) / "config.yaml", yaml.safe_dump(data, sort_keys=False)
        text += "".join(f"# {note}\n" for note in notes)
    else:
        path, text = Path(run_dir) / "config.json", json.dumps(data, indent=2) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path

