"""The trainer in parts: ``loop.py`` (train, the loop top to bottom), ``step.py`` (the one
training step, shared with ``capsctl bench``), ``state.py`` (what a checkpoint holds and the
resume checks), ``metrics.py`` (the device-side accumulators), ``signals.py`` (SIGINT/SIGTERM and
agreement between ranks) and ``rundir.py`` (the run folder)."""

from capsctl.training.loop import train
from capsctl.training.rundir import check_run_dir, prepare_run_dir
from capsctl.training.signals import Interrupted
from capsctl.training.step import build_optimizer, lr_at

__all__ = ["train", "check_run_dir", "prepare_run_dir", "Interrupted", "lr_at", "build_optimizer"]
