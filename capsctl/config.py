"""Typed experiment configuration: dataclass defaults < YAML file < ``--set section.key=value``.

Every field carries its help text and its valid range in ``metadata``; the loader checks types and
ranges and names the offending key (with the closest valid key for a typo). The README's config
reference is the same metadata printed by ``capsctl config --reference``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capsctl.errors import ConfigError


def _f(default, help: str, *, min=None, max=None, choices=None, gt=None):
    """A dataclass field with its documentation and valid range."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "gt": gt}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _f("capsnet", "model family (see the model registry)",
                   choices=("capsnet", "em-capsnet", "cnn", "multimnist-cnn"))
    input_size: int = _f(28, "side of the square input image in pixels", min=8)
    in_channels: int = _f(1, "input channels", min=1)
    num_classes: int = _f(10, "number of classes (class capsules)", min=2)
    conv1_channels: int = _f(256, "Conv1 output channels", min=1)
    conv1_kernel: int = _f(9, "Conv1 kernel size (stride 1, no padding, ReLU)", min=1)
    primary_types: int = _f(32, "PrimaryCaps capsule types (channels = types x dim)", min=1)
    primary_dim: int = _f(8, "PrimaryCaps capsule dimension", min=1)
    primary_kernel: int = _f(9, "PrimaryCaps kernel size", min=1)
    primary_stride: int = _f(2, "PrimaryCaps stride", min=1)
    class_dim: int = _f(16, "DigitCaps (class capsule) dimension", min=1)
    routing_iterations: int = _f(3, "routing-by-agreement iterations (coupling passes)", min=1)
    transform_init_std: float = _f(0.01, "std of the normal init of the W_ij matrices", gt=0)
    primary_scale: float = _f(1.0, "scale applied to PrimaryCaps before the squash "
                              "(authors' code: 1/32; paper: 1)", gt=0)
    class_bias: bool = _f(False, "learned bias added to s_j (the authors' code has one; the "
                          "paper and its parameter count do not)")
    decoder: bool = _f(True, "reconstruction decoder from the masked class capsules")
    decoder_hidden: list[int] = _f([512, 1024], "decoder hidden layer widths (ReLU); output "
                                   "is sigmoid of input_size^2 x in_channels")
    dropout: float = _f(0.5, "dropout probability (CNN baselines only)", min=0.0, max=0.99)
    cnn_channels: list[int] = _f([256, 256, 128], "CNN baseline conv channels (5x5)")
    cnn_hidden: list[int] = _f([328, 192], "CNN baseline fully connected widths")
    cnn_pool: list[int] = _f([], "cnn: max-pooling window (= stride) after each conv, one per "
                             "entry of cnn_channels, 1 = none; [] = no pooling (Table 1 baseline)")

    em_conv1_channels: int = _f(32, "em-capsnet: A, channels of ReLU Conv1 (5x5, stride 2)",
                                min=1)
    em_primary_types: int = _f(32, "em-capsnet: B, PrimaryCaps types (4x4 pose = 1x1 conv of "
                               "Conv1, activation = sigmoid)", min=1)
    em_caps1_types: int = _f(32, "em-capsnet: C, ConvCaps1 types (K=3, stride 2)", min=1)
    em_caps2_types: int = _f(32, "em-capsnet: D, ConvCaps2 types (K=3, stride 1)", min=1)
    em_iterations: int = _f(3, "em-capsnet: EM routing iterations per capsule layer", min=1)
    em_lambda: float = _f(0.01, "em-capsnet: inverse temperature scale; iteration t (from 0) "
                          "uses em_lambda * (1 - em_lambda_rate^(t+1))", gt=0)
    em_lambda_rate: float = _f(0.95, "em-capsnet: rate of the inverse temperature schedule "
                               "(0 = constant em_lambda)", min=0.0, max=0.999999)
    em_var_floor: float = _f(1e-4, "em-capsnet: floor added to every routing variance "
                             "(keeps log sigma finite, e.g. for a parent with one child)", gt=0)
    em_init_std: float = _f(0.5, "em-capsnet: std of the normal noise added to the identity to "
                            "initialise the 4x4 transformation matrices", min=0.0)
    em_coordinate_addition: bool = _f(True, "em-capsnet: add the scaled receptive-field centre "
                                      "(row, column) to the class capsules' votes")

@dataclass
class LossConfig:
    m_plus: float = _f(0.9, "margin loss: target length for the present class", min=0.0, max=1.0)
    m_minus: float = _f(0.1, "margin loss: ceiling for absent classes", min=0.0, max=1.0)
    down_weight: float = _f(0.5, "margin loss: lambda, down-weighting of absent classes",
                            min=0.0)
    recon_weight: float = _f(0.0005, "weight of the reconstruction sum of squared errors "
                             "(0 disables the term)", min=0.0)

    spread_m_start: float = _f(0.2, "spread loss (em-capsnet): margin at step 0", min=0.0,
                               max=1.0)
    spread_m_end: float = _f(0.9, "spread loss (em-capsnet): final margin", min=0.0, max=1.0)
    spread_m_steps: int = _f(10000, "spread loss (em-capsnet): optimizer steps over which the "
                             "margin rises linearly from start to end (0 = end at once)", min=0)

@dataclass
class DataConfig:
    dataset: str = _f("mnist", "training dataset (expanded-mnist: the digit anywhere on a 40x40 "
                      "canvas, see data.shift)", choices=("mnist", "expanded-mnist", "multimnist",
                                                  "smallnorb"))
    root: str | None = _f(None, "folder with the IDX files (flag --data-root and CAPSCTL_DATA "
                          "apply when this is null)")
    download: bool = _f(False, "download MNIST with torchvision (and affNIST, when evaluated) "
                        "when the files are missing")
    val_size: int = _f(5000, "images held out from the end of the training set for validation",
                       min=0)
    shift: int = _f(2, "random integer shift in pixels each way (zero padding), training only; "
                    "expanded-mnist: up to 6 on its 40x40 canvas", min=0)
    multimnist_shift: int = _f(4, "MultiMNIST: shift of each digit, up to N px each way (paper 4; "
                               "the authors' README used 6)", min=0)
    multimnist_pad: int = _f(4, "MultiMNIST: canvas border, canvas side = 28 + 2 x pad (paper: "
                             "36); model.input_size must equal it", min=0)
    multimnist_per_digit: int = _f(1000, "MultiMNIST: overlays per test digit in the fixed test "
                                   "stream (paper: 1,000 = 10M)", min=1)
    multimnist_val_per_digit: int = _f(2, "MultiMNIST: overlays per held-out validation digit "
                                       "(fixed, evaluated every epoch)", min=1)
    multimnist_test_limit: int = _f(100000, "MultiMNIST: test examples evaluated by default (the "
                                    "final test, eval without --limit); 0 = all", min=0)
    multimnist_seed: int = _f(0, "MultiMNIST: seed of the fixed validation and test pairs "
                              "(independent of train.seed, so runs share one test set)", min=0)


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "Adam learning rate", gt=0)
    beta1: float = _f(0.9, "Adam beta1", min=0.0, max=0.999999)
    beta2: float = _f(0.999, "Adam beta2", min=0.0, max=0.999999)
    eps: float = _f(1e-8, "Adam epsilon (TensorFlow's default)", gt=0)
    weight_decay: float = _f(0.0, "L2 weight decay", min=0.0)
    lr_decay: float = _f(0.96, "exponential decay factor per lr_decay_steps (1 = constant)",
                         gt=0, max=1.0)
    lr_decay_steps: int = _f(2000, "steps per decay factor (smooth, not staircase)", min=1)
    min_lr: float = _f(1e-6, "learning-rate floor", min=0.0)


@dataclass
class TrainConfig:
    epochs: int = _f(1, "epochs to train", min=1)
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = no limit)", min=0)
    batch_size: int = _f(128, "training batch size", min=1)
    eval_batch_size: int = _f(1000, "batch size for validation and test", min=1)
    seed: int = _f(0, "seed of the weights, batch order and augmentation", min=0)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (flag --device overrides)")
    precision: str = _f("fp32", "fp32, or bf16 autocast (squash, norms, losses stay fp32)",
                        choices=("fp32", "bf16"))
    compile: bool = _f(False, "torch.compile the model (falls back with a warning)")
    log_every: int = _f(50, "steps between logged training metrics", min=1)
    checkpoint_every: int = _f(500, "steps between last.pt writes (0 = only at epoch ends)",
                               min=0)
    checkpoint_minutes: float = _f(10.0, "also write last.pt when this many minutes have passed "
                                   "(0 = off)", min=0.0)
    images_every_epoch: bool = _f(True, "log a reconstruction grid to TensorBoard each epoch")
    nonfinite: str = _f("stop", "on a non-finite loss: stop (keep the last good checkpoint) or "
                        "skip the batch without an optimizer step (checks every step)",
                        choices=("stop", "skip"))
    target_val_accuracy: float = _f(0.0, "stop early once validation accuracy reaches this "
                                    "fraction, e.g. 0.9923 (0 = off)", min=0.0, max=1.0)
    final_eval: list[str] = _f([], "extra datasets evaluated (test split) with the best model at "
                               "the end, e.g. [affnist]; skipped with a note when absent")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS: dict[str, type] = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig,
            "optim": OptimConfig, "train": TrainConfig}


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp))


def _coerce(key: str, value: Any, tp, meta: dict) -> Any:
    """Check ``value`` against the field type ``tp`` and range ``meta``; return it normalised."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, inner[0], meta)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0], {}) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"config key '{key}' must be a finite number, got an integer "
                              f"of {len(str(abs(value)))} digits") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(meta['choices'])}; "
                          f"got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"config key '{key}' must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"config key '{key}' must be <= {meta['max']}, got {value!r}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"config key '{key}' must be > {meta['gt']}, got {value!r}")
    return value


_HINTS = typing.get_type_hints


def set_key(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config key '{key}'{_suggest(key, all_keys())}; keys look like "
                          "'section.key' with section one of " + ", ".join(SECTIONS))
    section, name = parts
    cls = SECTIONS[section]
    hints = _HINTS(cls)
    if name not in hints:
        raise ConfigError(f"unknown config key '{key}'{_suggest(key, all_keys())}")
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    setattr(getattr(cfg, section), name, _coerce(key, value, hints[name], meta))


def from_dict(data: Any, *, source: str = "config") -> Config:
    """Build a Config from a nested mapping, checking every key, type and range."""
    cfg = Config()
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown config section '{section}'"
                              f"{_suggest(str(section), list(SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys, "
                              f"got {values!r}")
        for name, value in values.items():
            try:
                set_key(cfg, f"{section}.{name}", value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Checks that involve more than one key."""
    m = cfg.model
    if m.name == "capsnet":
        conv1_out = m.input_size - m.conv1_kernel + 1
        grid = (conv1_out - m.primary_kernel) // m.primary_stride + 1
        if conv1_out < 1 or grid < 1:
            raise ConfigError(f"{source}: model.input_size={m.input_size} is too small for "
                              f"conv1_kernel={m.conv1_kernel} and primary_kernel="
                              f"{m.primary_kernel}; use a larger input or smaller kernels")
    if m.name == "cnn":
        _validate_cnn(m, source)
    if m.name == "em-capsnet":
        _validate_em(cfg, source)
    if cfg.train.target_val_accuracy > 0 and cfg.data.val_size == 0:
        raise ConfigError(f"{source}: train.target_val_accuracy needs a validation set; set "
                          "data.val_size > 0 or train.target_val_accuracy=0")
    if cfg.data.dataset == "expanded-mnist" and (m.input_size != 40 or cfg.data.shift > 6):
        raise ConfigError(f"{source}: data.dataset=expanded-mnist makes 40x40 images with the "
                          "digit up to 6 px from the centre; set model.input_size=40 (got "
                          f"{m.input_size}) and data.shift <= 6 (got {cfg.data.shift})")
    canvas = 28 + 2 * cfg.data.multimnist_pad
    if cfg.data.dataset == "multimnist" and m.input_size != canvas:
        raise ConfigError(f"{source}: data.dataset=multimnist makes {canvas}x{canvas} images "
                          f"(28 + 2 x data.multimnist_pad) but model.input_size is "
                          f"{m.input_size}; set model.input_size={canvas}")
    if cfg.loss.m_minus >= cfg.loss.m_plus:
        raise ConfigError(f"{source}: loss.m_minus ({cfg.loss.m_minus}) must be below "
                          f"loss.m_plus ({cfg.loss.m_plus})")
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"{source}: config key 'train.device' must be auto, cpu, cuda or "
                          f"cuda:N, got {dev!r}")


def _validate_cnn(m: ModelConfig, source: str) -> None:
    if m.cnn_pool and len(m.cnn_pool) != len(m.cnn_channels):
        raise ConfigError(f"{source}: model.cnn_pool has {len(m.cnn_pool)} entries but "
                          f"model.cnn_channels has {len(m.cnn_channels)}; give one window per "
                          "conv (1 = no pooling) or [] for none")
    if any(w < 1 for w in m.cnn_channels + m.cnn_hidden + m.cnn_pool):
        raise ConfigError(f"{source}: model.cnn_channels, cnn_hidden and cnn_pool entries must "
                          "be >= 1")
    side = m.input_size
    for w in m.cnn_pool:
        side //= w
    if side < 1:
        raise ConfigError(f"{source}: model.cnn_pool {m.cnn_pool} shrinks the "
                          f"{m.input_size}x{m.input_size} input to nothing; use fewer or smaller "
                          "pooling windows")


def _validate_em(cfg: Config, source: str) -> None:
    m = cfg.model
    if m.input_size < 17:  # grids (side - 5) // 2 + 1 -> (g - 3) // 2 + 1 -> g - 2 must be >= 1
        raise ConfigError(f"{source}: model.input_size={m.input_size} is too small for "
                          "em-capsnet (Conv1 5x5/2, ConvCaps 3x3/2 and 3x3/1 need at least 17)")
    if cfg.data.dataset == "smallnorb" and m.input_size != 32:
        raise ConfigError(f"{source}: data.dataset=smallnorb gives 32x32 crops; set "
                          "model.input_size=32")
    if cfg.loss.spread_m_start > cfg.loss.spread_m_end:
        raise ConfigError(f"{source}: loss.spread_m_start ({cfg.loss.spread_m_start}) must not "
                          f"exceed loss.spread_m_end ({cfg.loss.spread_m_end})")

def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with the value parsed as a YAML scalar (or flow list)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except Exception:  # YAMLError, or a constructor's ValueError (2001-02-30, "!!float ")
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML") from None
    return key, value


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a folder, not a YAML file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except (ValueError, TypeError, IndexError, OverflowError, RecursionError) as e:
        # the safe loader's constructors reject some values outright (2001-02-30, "!!float ")
        raise ConfigError(f"{path}: invalid YAML value ({type(e).__name__}: "
                          f"{str(e)[:100]})") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; copy one from configs/")
    return data


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML file < overrides (``section.key=value``)."""
    data = read_yaml(path) if path is not None else None
    cfg = from_dict(data, source=str(path) if path else "config")
    for text in overrides:
        key, value = parse_override(text)
        try:
            set_key(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"--set: {e}") from None
    validate(cfg, "--set")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def reference() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every config key: the README's config reference."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            shown = yaml.safe_dump(default, default_flow_style=True).strip()
            rows.append((f"{section}.{f.name}", shown.removesuffix("...").strip(),
                         f.metadata["help"]))
    return rows
