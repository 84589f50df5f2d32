"""`capsctl eval` as a researcher uses it: per-class accuracy and the confusion matrix (JSON and a
PNG), class names in the tables, ensembles of checkpoints, the confusion picture the trainer
logs at its final test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from capsctl import checkpoint
from capsctl.cli import app
from capsctl.config import from_dict, to_dict
from capsctl.data import mnist
from capsctl.data.augment import to_float
from capsctl.evaluate import confusion_counts, confusion_figure, evaluate, log_confusion, \
    per_class_accuracy
from capsctl.models import build_model
from conftest import tiny_config, write_fake_mnist

CPU = torch.device("cpu")
runner = CliRunner()
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def cli(*args, columns: int = 250):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})


def one_line_error(r, needle: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.output


def save_model(path: Path, seed: int, **sections) -> Path:
    """An untrained tiny model's checkpoint (different seeds: different predictions)."""
    cfg = tiny_config(model={"transform_init_std": 0.5, **sections.pop("model", {})},
                      **sections)
    torch.manual_seed(seed)
    checkpoint.save(path, {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg),
                           "step": seed})
    return path


def scores_of(path: Path, images: np.ndarray) -> torch.Tensor:
    """Independent: raw torch.load, the model rebuilt from the stored config, one forward."""
    state = torch.load(path, weights_only=True)
    model = build_model(from_dict(state["config"]).model)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        return model.eval()(to_float(torch.from_numpy(images.copy())))["scores"]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_fake_mnist(tmp_path / "mnist", n_train=64, n_test=40)


def test_per_class_accuracy_and_confusion_in_json(tmp_path, data):
    ck = save_model(tmp_path / "a.pt", 1)
    r = cli("eval", ck, "--data-root", data, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    images, labels = mnist.load_split(data, "test")
    pred = scores_of(ck, images).argmax(1).numpy()
    want = np.zeros((10, 10), np.int64)
    np.add.at(want, (labels, pred), 1)
    assert result["confusion"] == want.tolist()
    assert result["classes"] == [str(k) for k in range(10)]
    per_class = result["per_class_accuracy"]
    for k in range(10):
        n_k = int((labels == k).sum())
        expect = None if n_k == 0 else float(((pred == k) & (labels == k)).sum() / n_k)
        assert per_class[str(k)] == pytest.approx(expect) if expect is not None else \
            per_class[str(k)] is None
    assert sum(want.diagonal()) == result["correct"] and want.sum() == result["n"] == 40

    r = cli("eval", ck, "--data-root", data)             # tables: overall, then per class
    assert r.exit_code == 0, r.output
    assert "accuracy per class" in r.stdout and "a.pt on mnist" in r.stdout


def test_confusion_png(tmp_path, data):
    ck = save_model(tmp_path / "a.pt", 1)
    png = tmp_path / "figs" / "confusion.png"
    r = cli("eval", ck, ck, "--data-root", data, "--confusion", png)
    assert r.exit_code == 0, r.output
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200
    assert "confusion matrix:" in r.stderr
    # a bad target fails before anything is evaluated
    (tmp_path / "file").write_text("x")
    one_line_error(cli("eval", ck, "--data-root", data, "--confusion", tmp_path / "figs"),
                   "is a folder")
    one_line_error(cli("eval", ck, "--data-root", data, "--confusion",
                       tmp_path / "file" / "c.png"), "cannot write into")


def test_ensemble_averages_the_scores(tmp_path, data):
    paths = [save_model(tmp_path / f"m{k}.pt", k) for k in (1, 2, 3)]
    r = cli("eval", *paths, "--data-root", data, "--ensemble", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)                        # one row: one object
    assert result["checkpoint"] == "ensemble of 3"
    assert result["checkpoints"] == [str(p) for p in paths]
    images, labels = mnist.load_split(data, "test")
    mean = torch.stack([scores_of(p, images) for p in paths]).mean(0)
    acc = float((mean.argmax(1).numpy() == labels).mean())
    assert result["accuracy"] == pytest.approx(acc, abs=1e-12)
    singles = [float((scores_of(p, images).argmax(1).numpy() == labels).mean()) for p in paths]
    assert len(set(singles + [acc])) > 1                 # the members do disagree

    r = cli("eval", *paths, "--data-root", data, "--ensemble")
    assert r.exit_code == 0, r.output
    assert "ensemble of 3" in r.stdout and "m1.pt" not in r.stdout


def test_ensemble_members_must_share_dataset_and_input(tmp_path, data):
    a = save_model(tmp_path / "a.pt", 1)
    b = save_model(tmp_path / "b.pt", 2, data={"name": "fashion-mnist"})
    one_line_error(cli("eval", a, b, "--data-root", data, "--ensemble"),
                   f"--ensemble: {b} has dataset fashion-mnist (the first: mnist)")
    c = save_model(tmp_path / "c.pt", 3, data={"name": "expanded-mnist"})
    one_line_error(cli("eval", a, c, "--data-root", data, "--ensemble"), "has dataset")


def test_class_names_label_the_tables(tmp_path):
    root = tmp_path / "data"
    write_fake_mnist(root / "fashion-mnist", n_train=64, n_test=40)   # MNIST's file names
    ck = save_model(tmp_path / "f.pt", 1, data={"name": "fashion-mnist"})
    r = cli("eval", ck, "--data-root", root, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["classes"] == FASHION and list(result["per_class_accuracy"]) == FASHION
    r = cli("eval", ck, "--data-root", root)
    assert r.exit_code == 0, r.output
    assert "T-shirt/top" in r.stdout and "Ankle boot" in r.stdout
    # names stored in the checkpoint win (a folder dataset's come from its files)
    state = torch.load(ck, weights_only=True)
    checkpoint.save(ck, {**state, "class_names": [f"c{k}" for k in range(10)]})
    r = cli("eval", ck, "--data-root", root, "--json")
    assert list(json.loads(r.stdout)["per_class_accuracy"])[:2] == ["c0", "c1"]


def test_evaluate_counts_on_the_device_only_when_asked(tmp_path, data):
    from capsctl.data.build import build_eval

    cfg = tiny_config()
    model = build_model(cfg.model).eval()
    source = build_eval("mnist", "test", cfg, CPU, str(data))
    plain = evaluate(model, source, 16, CPU)
    assert "confusion" not in plain and "per_class_accuracy" not in plain
    full = evaluate(model, source, 16, CPU, confusion=True)
    assert {k: full[k] for k in plain} == plain
    assert sum(map(sum, full["confusion"])) == full["n"]
    assert sum(full["confusion"][k][k] for k in range(10)) == full["correct"]


def test_confusion_counts_and_per_class_accuracy():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    y = torch.tensor([0, 1, 1, 2])
    c = confusion_counts(scores, y)
    assert c.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert per_class_accuracy(c.tolist()) == [1.0, 0.5, 1.0]
    assert per_class_accuracy([[0, 0], [1, 1]]) == [None, 0.5]


class Recorder:
    def __init__(self):
        self.images, self.rows = {}, {}

    def image(self, tag, img, step):
        self.images[tag] = (img, step)

    def log(self, metrics, step):
        self.rows.update(metrics)


def test_log_confusion_for_the_trainers_final_test():
    w = Recorder()
    m = {"n": 4, "accuracy": 0.75, "confusion": [[1, 0], [1, 2]],
         "per_class_accuracy": [1.0, 2 / 3]}
    log_confusion(w, m, ["cat", "dog"], step=7)
    img, step = w.images["test/confusion"]
    assert step == 7 and img.shape[0] == 3 and 0 <= float(img.min()) <= float(img.max()) <= 1
    assert w.rows == {"test/class_accuracy/cat": 1.0, "test/class_accuracy/dog": 2 / 3}
    w = Recorder()
    log_confusion(w, {"n": 4, "accuracy": 0.5}, ["a", "b"], step=1)   # a pair task: nothing
    assert not w.images and not w.rows


def test_confusion_figure_grows_with_the_names():
    counts = [[5, 1], [0, 4]]
    short = confusion_figure(counts, ["a", "b"], ["t"])
    long = confusion_figure(counts, ["a long class name", "b"], ["t"])
    assert long.shape[1] > short.shape[1] and long.shape[2] > short.shape[2]
    big = confusion_figure(torch.eye(100, dtype=torch.long).tolist(),
                           [str(k) for k in range(100)], ["t"])
    assert big.shape[2] < 1200                     # cells shrink for many classes
