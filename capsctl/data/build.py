"""Building data by name: ``build(cfg, device, root_flag)`` gives the training stream and the
validation and test sources of ``data.name``; ``build_eval(name, split, ...)`` one evaluation
source of any registered dataset (``data/registry.py``)."""

from __future__ import annotations

import dataclasses

import torch

from capsctl.config import check_fits
from capsctl.data import affnist, mnist
from capsctl.data.affnist import MissingDataError  # noqa: F401  (files absent: callers may skip)
from capsctl.data.datasets import DataBundle
from capsctl.data.registry import DATASETS
from capsctl.errors import ConfigError, DataError
from capsctl.fields import suggest
from capsctl.lazy import resolve


def build(cfg, device: torch.device, root_flag: str | None = None) -> DataBundle:
    """Train/val/test of the configured dataset (its files read once, kept on ``device``)."""
    return resolve(DATASETS[cfg.data.name].build)(cfg, device, root_flag)


def affnist_source(name: str, split: str, cfg, device, root_flag):
    """``affnist`` / ``affnist-synth``: the .mat files under the data root."""
    root = mnist.resolve_root(root_flag, cfg.data.root)
    return affnist.open_source(name, split, root, device, cfg.data.download)


def check_eval(name: str, cfg) -> None:
    """Raise unless ``name`` is a known dataset whose images fit the model of ``cfg``."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'{suggest(name, list(DATASETS))}; choose one "
                        f"of {', '.join(DATASETS)}")
    try:
        check_fits(cfg.model, name, _options(name, cfg), f"dataset '{name}'")
    except ConfigError as e:
        m = cfg.model.input_size
        fits = [n for n, s in DATASETS.items() if s.side(_options(n, cfg)) == m]
        raise DataError(f"{e}; this model can be evaluated on {', '.join(fits) or 'none'}") \
            from None


def _options(name: str, cfg):
    """The data options ``name`` is read with: the run's own for its dataset, else that
    dataset's defaults with the run's data root and download switch."""
    spec = DATASETS[name]
    if cfg.data.name == name or spec.options is None:
        return cfg.data
    return spec.options(name=name, root=cfg.data.root, download=cfg.data.download,
                        val_size=cfg.data.val_size)


def build_eval(name: str, split: str, cfg, device: torch.device, root_flag: str | None = None):
    """One evaluation source by dataset name and split (``test`` or ``val``)."""
    check_eval(name, cfg)
    spec = DATASETS[name]
    if spec.options is None:
        return resolve(spec.build)(name, split, cfg, device, root_flag)
    if cfg.data.name != name:
        cfg = dataclasses.replace(cfg, data=_options(name, cfg))
    bundle = build(cfg, device, root_flag)
    source = bundle.val if split == "val" else bundle.test
    if source is None:
        raise DataError(f"dataset '{name}' has no '{split}' split (data.val_size is 0 in the "
                        "checkpoint's config)")
    return source
