"""The run folder has one home (capsctl/runfolder.py): its file names, the one rule of which
keys a resume may change, and what a folder holds for a config - the answer `train --resume`
and `sweep` both act on."""

from __future__ import annotations

import copy

import pytest

from capsctl import config as config_mod, sweep
from capsctl.cli.train import _resume_config
from capsctl.errors import CapsctlError
from capsctl.runfolder import (FINISHED, FOREIGN, NEW, RESUMABLE, STARTED, RunFolder,
                               may_change_on_resume)
from capsctl.training.rundir import prepare_run_dir, write_config
from conftest import tiny_config

# (key, a value other than the tiny config's): the keys a resume may change and those it may not
CHANGES = [("train.precision", "bf16"), ("train.seed", 7), ("train.batch_size", 8),
           ("train.epochs", 5), ("train.max_steps", 3), ("train.log_every", 3),
           ("train.eval_batch_size", 32), ("optim.lr", 0.01), ("data.val_size", 16),
           ("data.download", True), ("model.routing_iterations", 2)]


def _started(tmp_path):
    cfg = tiny_config()
    folder = prepare_run_dir(tmp_path, "run", force=False)
    write_config(RunFolder(folder), cfg)   # a run that died before its first checkpoint
    return folder, cfg


@pytest.mark.parametrize("key,value", CHANGES, ids=[k for k, _ in CHANGES])
def test_train_resume_and_sweep_apply_the_same_resume_rule(tmp_path, key, value):
    folder, cfg = _started(tmp_path)
    asked = copy.deepcopy(cfg)
    config_mod.set_key(asked, key, value)
    sweep_takes_it = RunFolder(folder).state(asked).kind != FOREIGN
    try:
        _resume_config(folder, [f"{key}={value}"], None)
        train_takes_it = True
    except CapsctlError:
        train_takes_it = False
    assert train_takes_it == sweep_takes_it == may_change_on_resume(key)
    if not sweep_takes_it:
        with pytest.raises(CapsctlError, match="another config"):
            sweep.status(folder, asked)


def test_precision_is_fixed_on_resume():
    """It fixes every number after the resumed step; `train --resume` once let it change."""
    assert not may_change_on_resume("train.precision")
    assert may_change_on_resume("train.epochs") and may_change_on_resume("data.root")


def test_the_folder_states(tmp_path):
    cfg = tiny_config()
    assert RunFolder(tmp_path / "none").state(cfg).kind == NEW
    folder, cfg = _started(tmp_path)
    run = RunFolder(folder)
    assert run.state(cfg).kind == STARTED
    run.last.write_bytes(b"x")
    assert run.state(cfg).kind == RESUMABLE
    run.metrics.write_text('{"step": 4, "test/accuracy": 0.5}\n')
    assert run.state(cfg).kind == FINISHED


def test_a_checkpoint_knows_its_run_folder(tmp_path):
    run = RunFolder(tmp_path / "r")
    assert RunFolder.of_checkpoint(run.best) == run
    assert RunFolder.of_checkpoint(tmp_path / "elsewhere.pt").root == tmp_path
    assert run.tb.parent == run.metrics.parent == run.config.parent == run.root
