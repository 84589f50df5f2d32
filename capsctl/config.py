"""Typed experiment configuration: dataclass defaults < YAML file < ``--set section.key=value``.

Five sections. ``optim`` and ``train`` are fixed dataclasses (here); ``model`` and ``loss`` are
the dataclasses of the model family that ``model.name`` picks (``models/registry.py``), and
``data`` the options of the dataset that ``data.name`` picks (``data/registry.py``). A key is
checked against the chosen family's or dataset's dataclass only: a key of another family is an
error naming the family and its valid keys.

Every field carries its help text and valid range in ``metadata`` (``capsctl/fields.py``); the
README's config reference is the same metadata (``capsctl config --reference``). Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from capsctl.data.mnist_config import MNISTConfig
from capsctl.data.registry import DATASETS, TRAINING
from capsctl.errors import ConfigError
from capsctl.fields import default_of, field, field_names, set_field, suggest
from capsctl.models.capsnet_config import CapsNetConfig, MarginLossConfig
from capsctl.models.registry import MODELS


@dataclass
class OptimConfig:
    lr: float = field(1e-3, "Adam learning rate", gt=0)
    beta1: float = field(0.9, "Adam beta1", min=0.0, max=0.999999)
    beta2: float = field(0.999, "Adam beta2", min=0.0, max=0.999999)
    eps: float = field(1e-8, "Adam epsilon (TensorFlow's default)", gt=0)
    weight_decay: float = field(0.0, "L2 weight decay", min=0.0)
    lr_decay: float = field(0.96, "exponential decay factor per lr_decay_steps (1 = constant)",
                            gt=0, max=1.0)
    lr_decay_steps: int = field(2000, "steps per decay factor (smooth, not staircase)", min=1)
    min_lr: float = field(1e-6, "learning-rate floor", min=0.0)

    def check(self, source: str) -> None:
        pass


@dataclass
class TrainConfig:
    epochs: int = field(1, "epochs to train", min=1, max=1_000_000)
    max_steps: int = field(0, "stop after this many optimizer steps (0 = no limit)", min=0)
    batch_size: int = field(128, "training batch size", min=1, max=1_000_000)
    eval_batch_size: int = field(1000, "batch size for validation and test", min=1, max=1_000_000)
    seed: int = field(0, "seed of the weights, batch order and augmentation", min=0,
                      max=2 ** 63 - 1)
    device: str = field("auto", "auto | cpu | cuda | cuda:N (flag --device overrides)")
    precision: str = field("fp32", "fp32, or bf16 autocast (squash, norms, losses stay fp32)",
                           choices=("fp32", "bf16"))
    compile: bool = field(False, "torch.compile the model (falls back with a warning)")
    log_every: int = field(50, "steps between logged training metrics", min=1)
    checkpoint_every: int = field(500, "steps between last.pt writes (0 = only at epoch ends)",
                                  min=0)
    checkpoint_minutes: float = field(10.0, "also write last.pt when this many minutes have passed "
                                      "(0 = off)", min=0.0)
    images_every_epoch: bool = field(True, "log a reconstruction grid to TensorBoard each epoch")
    nonfinite: str = field("stop", "on a non-finite loss: stop (keep the last good checkpoint) or "
                           "skip the batch without an optimizer step (checks every step)",
                           choices=("stop", "skip"))
    target_val_accuracy: float = field(0.0, "stop early once validation accuracy reaches this "
                                       "fraction, e.g. 0.9923 (0 = off)", min=0.0, max=1.0)
    final_eval: list[str] = field([], "extra datasets evaluated (test split) with the best model "
                                  "at the end, e.g. [affnist]; skipped with a note when absent")

    def check(self, source: str) -> None:
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:")
                                                    and dev[5:].isdigit())):
            raise ConfigError(f"{source}: config key 'train.device' must be auto, cpu, cuda or "
                              f"cuda:N, got {dev!r}")
        for name in self.final_eval:
            if name not in DATASETS:
                raise ConfigError(f"{source}: train.final_eval: unknown dataset '{name}'"
                                  f"{suggest(name, list(DATASETS))}; choose from "
                                  f"{', '.join(DATASETS)}")


@dataclass
class Config:
    """``model``/``loss``: the chosen family's dataclasses; ``data``: the chosen dataset's."""

    model: Any = dataclasses.field(default_factory=CapsNetConfig)
    loss: Any = dataclasses.field(default_factory=MarginLossConfig)
    data: Any = dataclasses.field(default_factory=MNISTConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


SECTIONS = ("model", "loss", "data", "optim", "train")
TASK_WORDS = {"single": "one-label", "pair": "two-label"}
DEFAULT_MODEL, DEFAULT_DATA = "capsnet", "mnist"


def _family(name: Any, source: str) -> str:
    if not isinstance(name, str) or name not in MODELS:  # a list or mapping is not hashable
        raise ConfigError(f"{source}: config key 'model.name' must be one of "
                          f"{', '.join(MODELS)}; got {name!r}{suggest(str(name), list(MODELS))}")
    return name


def _dataset(name: Any, source: str) -> str:
    if not isinstance(name, str) or name not in TRAINING:
        only_eval = isinstance(name, str) and name in DATASETS
        raise ConfigError(f"{source}: config key 'data.name' must be one of "
                          f"{', '.join(TRAINING)}; got {name!r}"
                          + (" (an evaluation-only dataset: use it in train.final_eval or "
                             "capsctl eval --dataset)" if only_eval else
                             suggest(str(name), list(TRAINING))))
    return name


def empty(model: str = DEFAULT_MODEL, dataset: str = DEFAULT_DATA) -> Config:
    """The defaults of family ``model`` trained on ``dataset``."""
    spec = MODELS[model]
    return Config(model=spec.config(name=model), loss=spec.loss_config(),
                  data=DATASETS[dataset].options(name=dataset))


def _owners(section: str, key: str) -> list[str]:
    """The families (``model``/``loss``) or datasets (``data``) that do have ``key``."""
    if section == "data":
        return [n for n in TRAINING if key in field_names(DATASETS[n].options)]
    attr = "config" if section == "model" else "loss_config"
    return [n for n, s in MODELS.items() if key in field_names(getattr(s, attr))]


def _set(cfg: Config, section: str, key: str, value: Any) -> None:
    """Set one key, with the errors a user needs: another family's key names its owner."""
    obj = getattr(cfg, section)
    if key == "name" and section in ("model", "data") and value != obj.name:
        raise ConfigError(f"config key '{section}.name' cannot change here (from {obj.name!r} "
                          f"to {value!r}); start a new run with the other {section}")
    if section in ("model", "loss", "data") and key not in field_names(type(obj)):
        owners = _owners(section, str(key))
        what = (f"dataset {cfg.data.name}" if section == "data" else
                f"model family {cfg.model.name}" + ("'s loss" if section == "loss" else ""))
        if owners:
            raise ConfigError(f"config key '{section}.{key}' is not an option of {what} (it "
                              f"belongs to {', '.join(owners)}); {what} takes: "
                              f"{', '.join(field_names(type(obj))) or 'no keys'}")
    set_field(obj, section, str(key), value)


def _mapping(data: Any, source: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown config section '{section}'"
                              f"{suggest(str(section), list(SECTIONS))}; sections: "
                              f"{', '.join(SECTIONS)}")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys, "
                              f"got {values!r}")
    if isinstance(data.get("data"), dict) and "dataset" in data["data"]:
        raise ConfigError(f"{source}: data.dataset is now data.name (capsctl 0.2); rename the "
                          "key")
    return data


def _build(data: dict, source: str, model: str | None = None, dataset: str | None = None
           ) -> Config:
    """A Config from a checked mapping: the family and dataset first, then every key."""
    m = _family(model or (data.get("model") or {}).get("name", DEFAULT_MODEL), source)
    d = _dataset(dataset or (data.get("data") or {}).get("name", DEFAULT_DATA), source)
    cfg = empty(m, d)
    for section, values in data.items():
        for key, value in (values or {}).items():
            if key == "name" and section in ("model", "data"):
                continue
            try:
                _set(cfg, section, key, value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def follow_dataset(cfg: Config, root_flag: str | None = None) -> None:
    """The model's ``input_size``, ``in_channels`` and ``num_classes`` left null take the
    dataset's image side, (first) channel count and class count. A ``folder`` dataset's classes
    are its subfolders: found under ``root_flag`` (--data-root) or ``data.root``; when neither
    is known yet, ``num_classes`` stays null and the dataset's builder checks it."""
    m, d = cfg.model, cfg.data
    spec = DATASETS[d.name]
    if m.input_size is None:
        m.input_size = spec.side(d)
    if m.in_channels is None:
        m.in_channels = spec.channel_counts(d)[0]
    if m.num_classes is None:
        names = spec.class_names(d, root_flag)
        m.num_classes = len(names) if names is not None else None


def from_dict(data: Any, *, source: str = "config") -> Config:
    """Build a Config from a nested mapping, checking every key, type and range."""
    cfg = _build(_mapping(data, source), source)
    validate(cfg, source)
    return cfg


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.key`` on a built config (the family and dataset cannot change)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] in SECTIONS:  # a key of a nested section: model.routing.KEY
        parts, value = parts[:2], {parts[2]: value}
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config key '{key}'; keys look like 'section.key' with "
                          f"section one of {', '.join(SECTIONS)}")
    _set(cfg, parts[0], parts[1], value)


def validate(cfg: Config, source: str = "config", root_flag: str | None = None) -> None:
    """Checks that involve more than one key: each section's own, then model against data.
    Model dimensions left null are filled in from the dataset first."""
    follow_dataset(cfg, root_flag)
    for section in SECTIONS:
        getattr(cfg, section).check(source)
    m, d = cfg.model, cfg.data
    spec, dspec = MODELS[m.name], DATASETS[d.name]
    if dspec.task not in spec.losses:
        fits = [n for n, s in MODELS.items() if dspec.task in s.losses]
        kind = TASK_WORDS.get(dspec.task, dspec.task)
        raise ConfigError(f"{source}: model family {m.name} cannot learn dataset {d.name} "
                          f"(a {kind} task); use {' or '.join(fits)}")
    check_fits(m, d.name, d, source, root_flag)
    if cfg.train.target_val_accuracy > 0 and d.val_size == 0:
        raise ConfigError(f"{source}: train.target_val_accuracy needs a validation set; set "
                          "data.val_size > 0 or train.target_val_accuracy=0")


def check_fits(m: Any, dataset: str, options: Any, source: str,
               root_flag: str | None = None) -> None:
    """The model's input and classes must be what ``dataset`` gives (classes only where they
    are known: a ``folder`` dataset's builder checks its own)."""
    dspec = DATASETS[dataset]
    side, channels = dspec.side(options), dspec.channel_counts(options)
    if m.input_size != side:
        raise ConfigError(f"{source}: dataset {dataset} makes {side}x{side} images but "
                          f"model.input_size is {m.input_size}; set model.input_size={side}")
    if m.in_channels not in channels:
        raise ConfigError(f"{source}: dataset {dataset} gives "
                          f"{' or '.join(map(str, channels))} channel(s) but "
                          f"model.in_channels is {m.in_channels}")
    names = dspec.class_names(options, root_flag)
    if names is not None and m.num_classes != len(names):
        raise ConfigError(f"{source}: dataset {dataset} has {len(names)} classes but "
                          f"model.num_classes is {m.num_classes}; set "
                          f"model.num_classes={len(names)}")


def parse_override(text: str, option: str = "--set") -> tuple[str, Any]:
    """``section.key=value`` with the value parsed as YAML 1.2 (a scalar, or a flow list):
    ``010`` is 10, never the octal 8, and ``1:30`` is a string, never 90
    (``safe_yaml.parse_value``)."""
    if "=" not in text:
        raise ConfigError(f"{option} expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    return key, parse_value(raw, f"{option} {key}")


def parse_value(raw: str, where: str) -> Any:
    """One command-line value (``where``: the option and key, for the message) as YAML 1.2."""
    from capsctl.safe_yaml import parse_value as parse_yaml_1_2

    if len(raw) > 10000:
        raise ConfigError(f"{where}: the value is {len(raw)} characters long; a config value "
                          "is at most 10,000")
    try:
        return parse_yaml_1_2(raw) if raw.strip() != "" else ""
    except Exception:  # YAMLError, or a constructor's ValueError ("!!float ")
        raise ConfigError(f"{where}: cannot parse value {raw!r} as YAML") from None


def parse_overrides(texts: list[str] | tuple[str, ...], option: str = "--set"
                    ) -> list[tuple[str, Any]]:
    """Every ``section.key=value`` of the command line, parsed; a key given twice is refused
    (as a YAML file refuses a duplicate key) instead of the last one silently winning."""
    parsed, seen = [], {}
    for text in texts:
        key, value = parse_override(text, option)
        if key in seen:
            raise ConfigError(f"{option} {key} is given twice ({seen[key]!r} and "
                              f"{text.split('=', 1)[1].strip()!r}); keep one")
        seen[key] = text.split("=", 1)[1].strip()
        parsed.append((key, value))
    return parsed


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file (hostile input refused with one line: capsctl/safe_yaml.py)."""
    from capsctl.safe_yaml import read_yaml as read

    return read(path)


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
         root_flag: str | None = None) -> Config:
    """Defaults < YAML file < overrides (``section.key=value``). ``--set model.name=...`` and
    ``--set data.name=...`` pick the family and dataset before the file's keys are read.
    ``root_flag`` (--data-root) is where a ``folder`` dataset's classes are looked up."""
    source = str(path) if path else "config"
    data = _mapping(read_yaml(path), source) if path is not None else {}
    parsed = parse_overrides(overrides)
    names = {k.split(".")[0]: v for k, v in parsed if k in ("model.name", "data.name")}
    try:
        model = _family(names["model"], "--set") if "model" in names else None
        dataset = _dataset(names["data"], "--set") if "data" in names else None
    except ConfigError as e:
        raise ConfigError(str(e)) from None
    cfg = _build(data, source, model, dataset)
    for key, value in parsed:
        if key in ("model.name", "data.name"):
            continue
        try:
            set_key(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"--set: {e}") from None
    validate(cfg, "--set" if overrides else source, root_flag)
    return cfg


def to_dict(cfg: Config) -> dict:
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _rows(section: str, cls: type) -> list[tuple[str, str, str]]:
    rows = []
    for f in dataclasses.fields(cls):
        default = default_of(f)
        if f.metadata.get("nested"):  # a nested section: its name here, its keys in their tables
            default = default.name
        shown = yaml.safe_dump(default, default_flow_style=True).strip()
        rows.append((f"{section}.{f.name}", shown.removesuffix("...").strip(),
                     f.metadata["help"]))
    return rows


def reference() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The README's config reference: (title, rows of (key, default, meaning)) per table - one
    per model family, its loss, each dataset, then optim and train."""
    tables = []
    for name, spec in MODELS.items():
        tables.append((f"model: {name} - {spec.summary}", _rows("model", spec.config)))
        for f in dataclasses.fields(spec.config):  # nested sections: a table per variant
            for title, cls in f.metadata.get("variants", list)():
                tables.append((f"model.{f.name}: {title}", _rows(f"model.{f.name}", cls)))
        tables.append((f"loss: {name}", _rows("loss", spec.loss_config)))
    for name in TRAINING:
        tables.append((f"data: {name} - {DATASETS[name].summary}",
                       _rows("data", DATASETS[name].options)))
    tables.append(("optim", _rows("optim", OptimConfig)))
    tables.append(("train", _rows("train", TrainConfig)))
    return tables


def reference_markdown() -> str:
    """``reference()`` as Markdown: a heading and a table per section variant."""
    out = []
    for title, rows in reference():
        out += [f"#### {title}", ""]
        if not rows:
            out += ["No keys: this loss has nothing to set.", ""]
            continue
        out += ["| key | default | meaning |", "| --- | --- | --- |"]
        out += [f"| `{k}` | `{d}` | {h.replace('|', '/')} |" for k, d, h in rows]
        out.append("")
    return "\n".join(out)
