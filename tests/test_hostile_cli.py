"""Hostile and clumsy input on the command line (issue 24, items 7-13), each through the CLI:
folders whose classes differ from the checkpoint's, a sweep rerun with other settings, an
ensemble of models with different kinds of score, YAML 1.1 surprises and repeated keys on the
command line, run folders `compare` did not write, a bad distributed environment, square
brackets in user-given strings and warnings as one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from capsctl.cli import app
from capsctl.config import dump
from conftest import REPO, tiny_config

runner = CliRunner()


def cli(*args, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_line_error(r, *needles: str) -> str:
    """Exit 2, one line on the output (stderr), no traceback, naming every needle."""
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output
    return lines[0]


# --- item 12: a bad distributed environment --------------------------------------------------

@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
    ({"WORLD_SIZE": "-3"}, "WORLD_SIZE=-3 must be"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": None, "MASTER_PORT": None},
     "MASTER_ADDR and MASTER_PORT are not set"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None},
     "MASTER_PORT is not set"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "RANK": "5"},
     "RANK=5 must be from 0 to 1"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
      "CAPSCTL_DIST_TIMEOUT": "abc"}, "CAPSCTL_DIST_TIMEOUT='abc' must be a number of seconds"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
      "CAPSCTL_DIST_TIMEOUT": "nan"}, "CAPSCTL_DIST_TIMEOUT='nan'"),
])
def test_a_bad_distributed_environment_is_one_line(tmp_path, env, needle):
    base = {"RANK": "0", "LOCAL_RANK": "0", "CAPSCTL_DIST_TIMEOUT": None}
    for args in (["train", REPO / "configs/mnist-quick.yaml", "--run-dir", tmp_path],
                 ["eval", tmp_path / "nothing.pt"]):
        one_line_error(cli(*args, env={**base, **env}), needle)
    assert list(tmp_path.iterdir()) == []


def test_nproc_checks_the_timeout_before_starting_torchrun(tmp_path):
    one_line_error(cli("train", REPO / "configs/mnist-quick.yaml", "--nproc", "2",
                       env={"CAPSCTL_DIST_TIMEOUT": "0", "WORLD_SIZE": None}),
                   "CAPSCTL_DIST_TIMEOUT='0'")


# --- item 10: --set and --vary values by YAML 1.2; a key set twice ---------------------------

def _config(*args) -> dict:
    r = cli("config", REPO / "configs/mnist-quick.yaml", *args)
    assert r.exit_code == 0, r.output
    return yaml.safe_load(r.stdout)


def test_set_values_follow_yaml_1_2():
    cfg = _config("--set", "train.seed=010", "--set", "train.max_steps=0x10",
                  "--set", "optim.lr=1e-3", "--set", "train.log_every=0o17")
    assert cfg["train"]["seed"] == 10          # YAML 1.1: 8 (octal)
    assert cfg["train"]["max_steps"] == 16
    assert cfg["optim"]["lr"] == 0.001
    assert cfg["train"]["log_every"] == 15
    # 1:30 is a string in YAML 1.2 (1.1: the sexagesimal 90), so not a learning rate
    one_line_error(cli("config", REPO / "configs/mnist-quick.yaml", "--set", "optim.lr=1:30"),
                   "optim.lr", "'1:30'")
    # yes/on are strings in YAML 1.2, not booleans
    one_line_error(cli("config", REPO / "configs/mnist-quick.yaml", "--set",
                       "train.compile=yes"), "train.compile", "true or false")


def test_a_key_set_twice_on_the_command_line_is_refused(tmp_path):
    line = one_line_error(cli("config", REPO / "configs/mnist-quick.yaml", "--set",
                              "train.seed=1", "--set", "train.seed=2"), "train.seed")
    assert "twice" in line
    line = one_line_error(cli("train", REPO / "configs/mnist-quick.yaml", "--run-dir", tmp_path,
                              "--set", "optim.lr=0.1", "--set", " optim.lr = 0.2"), "optim.lr")
    assert "twice" in line
    assert list(tmp_path.iterdir()) == []


def test_vary_values_equal_as_yaml_1_2_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text((REPO / "configs/mnist-quick.yaml").read_text())
    one_line_error(cli("sweep", cfg, "--run-dir", tmp_path, "--vary", "train.seed=1,01"),
                   "train.seed", "same config")
    one_line_error(cli("sweep", cfg, "--run-dir", tmp_path, "--vary", "train.seed=1,2",
                       "--set", "train.seed=3"), "train.seed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


# --- item 11: compare on folders it did not write --------------------------------------------

ROWS = [{"step": 10, "time": 100.0, "images_per_s": 50.0},
        {"step": 20, "time": 110.0, "val/accuracy": 0.90},
        {"step": 20, "time": 125.0, "test/accuracy": 0.94, "test/error": 0.06}]


def _run_folder(folder: Path, config_text: str | None = None, metrics: str | None = None
                ) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_text if config_text is not None
                                        else dump(tiny_config()))
    (folder / "metrics.jsonl").write_text(metrics if metrics is not None
                                          else "".join(json.dumps(r) + "\n" for r in ROWS))
    return folder


HOSTILE_METRICS = {"time-inf": '{"step": 30, "time": Infinity}\n',
                   "time-nan": '{"step": 30, "time": NaN}\n',
                   "time-1e308": '{"step": 30, "time": 1e308}\n',
                   "rate-1e400": '{"step": 30, "time": 130.0, "images_per_s": 1e400}\n',
                   "step-negative": '{"step": -5, "time": 130.0}\n'}
HOSTILE_CONFIGS = {"model-list": "model: [1, 2]\n", "data-string": "data: mnist\n",
                   "name-list": "model: {name: [a]}\n", "top-list": "- 1\n- 2\n",
                   "routing-map": "model: {name: capsnet, routing: {a: 1}}\n",
                   "yaml-syntax": "model: {name: [\n"}


def _hostile_folders(root: Path) -> list[Path]:
    good = "".join(json.dumps(r) + "\n" for r in ROWS)
    folders = [_run_folder(root / f"m-{k}", metrics=good + v) for k, v in HOSTILE_METRICS.items()]
    folders += [_run_folder(root / f"c-{k}", config_text=v) for k, v in HOSTILE_CONFIGS.items()]
    return folders


def test_compare_marks_unreadable_folders_and_compares_the_others(tmp_path):
    good = _run_folder(tmp_path / "good")
    bad = _hostile_folders(tmp_path)
    r = cli("compare", good, *bad, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    runs = {x["name"]: x for x in doc["runs"]}
    assert runs["good"]["unreadable"] is None and runs["good"]["test"] == {"mnist": 0.94}
    assert runs["good"]["finished"] and runs["good"]["model"] == "capsnet"
    for folder in bad:
        why = runs[folder.name]["unreadable"]
        assert why, folder.name
        assert ("metrics.jsonl line 4" if folder.name.startswith("m-") else "config.yaml") in why
    assert "Infinity" in runs["m-time-inf"]["unreadable"]
    assert "section 'model'" in runs["c-model-list"]["unreadable"]
    assert "model.name" in runs["c-name-list"]["unreadable"]

    r = cli("compare", good, *bad)          # the table: one row each, the bad ones marked
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "94.00%" in r.stdout
    for folder in bad:
        line = next(x for x in r.stdout.splitlines() if folder.name in x)
        assert "unreadable" in line, line


# --- item 8: a sweep rerun with other settings -------------------------------------------------

def _tiny_yaml(tmp_path: Path, root: Path) -> Path:
    raw = {"model": {"conv1_channels": 8, "primary_types": 2, "primary_dim": 4, "class_dim": 6,
                     "decoder_hidden": [16, 32], "transform_init_std": 0.1},
           "data": {"val_size": 32, "root": str(root)},
           "train": {"batch_size": 16, "eval_batch_size": 64, "log_every": 2,
                     "checkpoint_every": 0, "checkpoint_minutes": 0.0, "max_steps": 2,
                     "images_every_epoch": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_sweep_rerun_with_other_settings_names_the_keys(tmp_path, fake_mnist):
    config = _tiny_yaml(tmp_path, fake_mnist)
    sweep = ["sweep", config, "--run-dir", tmp_path / "runs", "--vary",
             "model.routing=dynamic", "--no-progress", "--json"]
    r = cli(*sweep)
    assert r.exit_code == 0, r.output
    point = tmp_path / "runs" / "tiny" / "routing=dynamic"
    first = (point / "metrics.jsonl").read_bytes()
    r = cli(*sweep)                                         # the same settings: skipped
    assert r.exit_code == 0 and "finished, skipped" in r.stderr, r.output

    line = one_line_error(cli(*sweep, "--set", "optim.lr=0.05"), "optim.lr (0.001 -> 0.05)",
                          "--force")
    assert "finished, skipped" not in line
    assert (point / "metrics.jsonl").read_bytes() == first  # nothing touched
    # train names the same difference for a folder of another config
    one_line_error(cli("train", config, "--run-dir", tmp_path / "runs" / "tiny", "--name",
                       "routing=dynamic", "--set", "optim.lr=0.05", "--no-progress"),
                   "another config", "optim.lr (0.001 -> 0.05)")

    r = cli(*sweep, "--set", "optim.lr=0.05", "--force")    # trained again, the old moved aside
    assert r.exit_code == 0, r.output
    assert "optim:\n  lr: 0.05" in (point / "config.yaml").read_text()
    aside = [p for p in point.parent.iterdir() if p.name.startswith("routing=dynamic.replaced-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_bytes() == first


# --- item 9: an ensemble averages one kind of score -------------------------------------------

def _save_model(path: Path, seed: int, **model) -> Path:
    import torch

    from capsctl import checkpoint
    from capsctl.config import to_dict
    from capsctl.models import build_model

    cfg = tiny_config(model=model)
    torch.manual_seed(seed)
    checkpoint.save(path, {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg),
                           "step": seed})
    return path


CNN = {"name": "cnn", "channels": [4], "hidden": [8]}


def test_an_ensemble_of_capsule_lengths_and_logits_is_refused(tmp_path, fake_mnist):
    caps = _save_model(tmp_path / "caps.pt", 1)
    cnn = _save_model(tmp_path / "cnn.pt", 2, **CNN)
    one_line_error(cli("eval", caps, cnn, "--data-root", fake_mnist, "--ensemble"),
                   f"{cnn} is a cnn whose scores are logits", "capsule lengths")
    one_line_error(cli("eval", cnn, caps, "--data-root", fake_mnist, "--ensemble", "--json"),
                   "scores are capsule lengths", "logits")
    # members of one kind still average (two CNNs)
    r = cli("eval", cnn, _save_model(tmp_path / "cnn2.pt", 3, **CNN), "--data-root",
            fake_mnist, "--ensemble", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "cnn"


# --- item 7: a folder's classes are matched to the checkpoint's by name ---------------------

def _picture_folder(root: Path, classes: dict[str, int], n: int = 4) -> Path:
    """ROOT/{train,test}/<name>/: class ``name`` is a bright band at height ``classes[name]``
    (the same pictures under any name)."""
    from PIL import Image

    for split in ("train", "test"):
        for name, band in classes.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = np.full((28, 28), 10 + 3 * i, np.uint8)
                a[3 + 5 * band:6 + 5 * band, 2 + i:24] = 250
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def _folder_checkpoint(path: Path, root: Path, names: list[str], **data) -> Path:
    import torch

    from capsctl import checkpoint
    from capsctl.config import to_dict
    from capsctl.models import build_model

    cfg = tiny_config(model={"transform_init_std": 0.5},
                      data={"name": "folder", "root": str(root), "image_size": 28,
                            "channels": 1, "val_size": 0, **data})
    torch.manual_seed(3)
    checkpoint.save(path, {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg),
                           "step": 0, "class_names": names})
    return path


def _eval_json(ck: Path, root: Path) -> dict:
    r = cli("eval", ck, "--data-root", root, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_eval_matches_a_folders_classes_by_name(tmp_path):
    bands = {"a": 0, "b": 2, "c": 4}
    full = _picture_folder(tmp_path / "abc", bands)
    ck = _folder_checkpoint(tmp_path / "m.pt", full, ["a", "b", "c"])
    base = _eval_json(ck, full)
    assert base["classes"] == ["a", "b", "c"] and base["n"] == 12
    conf = base["confusion"]

    # a subset {a, c}: scored as the checkpoint's a and c (rows as on the full folder)
    sub = _eval_json(ck, _picture_folder(tmp_path / "ac", {"a": 0, "c": 4}))
    assert sub["classes"] == ["a", "b", "c"] and sub["n"] == 8
    assert sub["confusion"] == [conf[0], [0, 0, 0], conf[2]]
    assert sub["correct"] == conf[0][0] + conf[2][2]
    assert sub["per_class_accuracy"]["b"] is None

    # the same count under other names: one line naming the difference, never a silent score
    line = one_line_error(cli("eval", ck, "--data-root",
                              _picture_folder(tmp_path / "bcd", {"b": 2, "c": 4, "d": 0})),
                          "classes the checkpoint does not know: d", "lacks the checkpoint's a")
    assert "a, b, c" in line
    # the case: checkpoint {a, b}, folder {b, c}
    ck2 = _folder_checkpoint(tmp_path / "ab.pt", _picture_folder(tmp_path / "ab",
                                                                 {"a": 0, "b": 2}), ["a", "b"])
    one_line_error(cli("eval", ck2, "--data-root", _picture_folder(tmp_path / "bc",
                                                                   {"b": 2, "c": 4})),
                   "does not know: c")


# --- item 13: user-given strings print as given; warnings are one line ------------------------

B = "[b]x"          # rich markup reads [b] as "bold": printed unescaped, it vanishes
WIDE = {"COLUMNS": "400"}
INFO_LINE = "capsctl train "   # training/loop.py's start line: see the test below


def _as_given(output: str, *strings: str, skip: tuple[str, ...] = ()) -> None:
    """Each user string is printed as given, and none in its markup-eaten form."""
    for s in strings:
        assert s in output, (s, output)
        eaten = s.replace("[b]", "")
        if eaten == s:
            continue
        bad = [line for line in output.splitlines()
               if eaten in line and not line.lstrip("│┃ ").startswith(skip)]
        assert not bad, bad


def test_every_command_prints_user_strings_as_given(tmp_path, fake_mnist):
    base = tmp_path / f"w {B}"
    base.mkdir()
    config = _tiny_yaml(base, fake_mnist)
    runs, name = base / f"runs {B}", f"n{B}"
    r = cli("train", config, "--run-dir", runs, "--name", name, "--no-progress", env=WIDE)
    assert r.exit_code == 0, r.output
    _as_given(r.output, f"runs {B}/{name}", f"w {B}", skip=(INFO_LINE,))
    run = runs / name

    png = base / f"c {B}.png"
    r = cli("eval", run / "checkpoints" / "best.pt", "--data-root", fake_mnist, "--confusion",
            png, env=WIDE)
    assert r.exit_code == 0, r.output
    assert png.is_file()
    _as_given(r.output, f"runs {B}/{name}/checkpoints/best.pt", f"c {B}.png")

    r = cli("compare", run, "--png", base / f"p {B}.png", env=WIDE)
    assert r.exit_code == 0, r.output
    _as_given(r.output, name, f"p {B}.png")

    r = cli("sweep", config, "--run-dir", base / f"s {B}", "--name", f"sw{B}", "--vary",
            "model.routing=dynamic", "--no-progress", env=WIDE)
    assert r.exit_code == 0, r.output
    _as_given(r.output, f"s {B}/sw{B}", skip=(INFO_LINE,))

    out = base / f"r {B}.png"
    r = cli("reconstruct", run, "--data-root", fake_mnist, "--n", "1", "--no-tb", "--out",
            out, env=WIDE)
    assert r.exit_code == 0, r.output
    _as_given(r.output, f"r {B}.png")

    r = cli("data", "affnist-synth", "--data-root", fake_mnist, "--per-digit", "1", "--out",
            base / f"syn {B}", env=WIDE)
    assert r.exit_code == 0, r.output
    _as_given(r.output, f"syn {B}", "[0.8, 1.2]")

    r = cli("config", config, "--set", f"data.root=d {B}")   # YAML on stdout, as given
    assert r.exit_code == 0 and f"root: d {B}" in r.stdout, r.output


def test_the_training_start_line_prints_the_run_folder_as_given(tmp_path, fake_mnist):
    config = _tiny_yaml(tmp_path, fake_mnist)
    r = cli("train", config, "--run-dir", tmp_path / f"runs {B}", "--no-progress", env=WIDE)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith(INFO_LINE))
    assert f"runs {B}/tiny" in line, line


def test_warnings_are_one_line(tmp_path):
    root = _picture_folder(tmp_path / f"pics {B}", {"a": 0, "b": 2})
    (root / "test" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    ck = _folder_checkpoint(tmp_path / "m.pt", root, ["a", "b"], skip_bad_images=True)
    r = cli("eval", ck, "--data-root", root, "--json", env=WIDE)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 8                     # the broken image left out
    lines = [x for x in r.stderr.splitlines() if "skipped" in x or "Warning" in x
             or x.startswith("warning")]
    assert len(lines) == 1, r.stderr                          # (and a note: decoding N images)
    assert lines[0].startswith("warning: folder dataset: skipped 1 unreadable image(s) of "
                               f"{root} (first: test/a/broken.png"), lines[0]
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr


def test_a_library_warning_during_a_command_is_one_line(monkeypatch):
    import warnings

    import capsctl.config

    real = capsctl.config.load

    def load(*args, **kwargs):
        warnings.warn("capsctl: something odd\n  in [b]two[/b] lines", UserWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(capsctl.config, "load", load)
    r = cli("config", REPO / "configs/mnist-quick.yaml")
    assert r.exit_code == 0, r.output
    assert r.stderr == "warning: something odd in [b]two[/b] lines\n", r.stderr
