"""Metric writers behind one interface: ``log(metrics, step)``, ``image(tag, img, step)``,
``close()``. TensorBoard for curves and pictures, ``metrics.jsonl`` for scripts. A write that
fails (a full disk) is one TrainingError line naming the file or folder."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from capsctl.errors import TrainingError


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into one TrainingError line."""
    try:
        yield
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}; free space or fix "
                            "permissions, then --resume") from None


_thread_hook = threading.excepthook


def _quiet_tensorboard_thread(args) -> None:
    """TensorBoard's writer thread dies on a failed write with a traceback on stderr; the
    writer's next call raises the same error, reported as one line, so the thread stays quiet."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
        return
    _thread_hook(args)


class JsonlWriter:
    """One JSON object per line: {"step": ..., "time": ..., **metrics}; flushed every line."""

    def __init__(self, path: Path):
        self.path = path
        with _writing(path):
            self.f = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in metrics.items()})
        with _writing(self.path):
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        with _writing(self.path):
            self.f.close()


class TensorBoardWriter:
    """Event files in ``log_dir``; ``purge_step``: on resume, events logged at or after it
    before the resume are hidden (they are recomputed)."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        threading.excepthook = _quiet_tensorboard_thread
        self.log_dir = log_dir
        with _writing(log_dir):
            self.w = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, metrics: dict, step: int) -> None:
        with _writing(self.log_dir):
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.w.add_scalar(k, v, step)
            self.w.flush()

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        """``img`` (3, H, W) or (1, H, W) float in [0, 1]."""
        with _writing(self.log_dir):
            self.w.add_image(tag, img, step)
            self.w.flush()

    def close(self) -> None:
        with _writing(self.log_dir):
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


def for_run(run_dir: Path, purge_step: int | None = None) -> Writers:
    """TensorBoard (``run_dir``/tb, events from ``purge_step`` on hidden) and metrics.jsonl."""
    from capsctl.runfolder import RunFolder

    run = RunFolder(run_dir)
    return Writers(TensorBoardWriter(run.tb, purge_step=purge_step), JsonlWriter(run.metrics))
