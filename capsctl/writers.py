"""Metric writers behind one interface: ``log(metrics, step)``, ``image(tag, img, step)``,
``close()``. TensorBoard for curves and pictures, ``metrics.jsonl`` for scripts."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


class JsonlWriter:
    """One JSON object per line: {"step": ..., "time": ..., **metrics}; flushed every line."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in metrics.items()})
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        self.f.close()


class TensorBoardWriter:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # on resume, events logged after the checkpoint's step are hidden (they are recomputed)
        self.w = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.w.add_scalar(k, v, step)
        self.w.flush()

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        """``img`` (3, H, W) or (1, H, W) float in [0, 1]."""
        self.w.add_image(tag, img, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class Writers:
    """Fan-out to several writers."""

    def __init__(self, *writers):
        self.writers = list(writers)

    def log(self, metrics: dict, step: int) -> None:
        for w in self.writers:
            w.log(metrics, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        for w in self.writers:
            w.image(tag, img, step)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def for_run(run_dir: Path, resume_step: int | None = None) -> Writers:
    return Writers(TensorBoardWriter(run_dir / "tb", purge_step=resume_step),
                   JsonlWriter(run_dir / "metrics.jsonl"))
