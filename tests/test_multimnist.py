"""MultiMNIST: the pair generator, the two-label loss and metrics, the baseline CNN, the
segmentation picture, and a tiny train -> eval -> picture run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capsctl import checkpoint
from capsctl.cli import app
from capsctl.config import from_dict
from capsctl.errors import ConfigError
from capsctl.data import mnist
from capsctl.data.datasets import ImageSet
from capsctl.data.multimnist import (ClassIndex, MultiEvalSource, MultiTrainStream,
                                     expected_frame_overlap, overlap_stats)
from capsctl.data.build import build_eval
from capsctl.data.registry import DATASETS, PAIR, SINGLE
from capsctl.evaluate import evaluate
from capsctl.inspection.draw import save_png
from capsctl.inspection.figures import GAP
from capsctl.models import MODELS, build_model, count_parameters, loss_fn
from capsctl.models.losses import multilabel_bce_losses, multimnist_losses
from capsctl.tasks import get as task_of
from capsctl.tasks.pair import bbox_overlap, pair_hits
from capsctl.training import prepare_run_dir, train
from conftest import REPO, tiny_config

CPU = torch.device("cpu")


def dot_digits(n: int = 60, value: int = 200) -> ImageSet:
    """Digits that are one bright pixel at (14, 14), labels cycling 0..9: a shift is readable."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 14, 14] = value
    return ImageSet(images, torch.arange(n) % 10)


def dot_position(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) with one lit pixel each -> (B, 2) its (row, col)."""
    flat = x.flatten(1).argmax(1)
    return torch.stack([flat // x.shape[-1], flat % x.shape[-1]], 1)


# --- generator --------------------------------------------------------------------------------

def test_training_pairs_have_two_classes_bounded_shifts_and_the_clipped_merge():
    data = dot_digits()
    stream = MultiTrainStream(data, batch_size=50, seed=3, shift=4, pad=4)
    seen, coincide = set(), 0
    for step in range(20):
        b = stream.batch(0, 0, step)
        assert b["x"].shape == b["x_a"].shape == b["x_b"].shape == (50, 1, 36, 36)
        assert (b["y"] != b["y2"]).all()
        for key in ("x_a", "x_b"):
            d = dot_position(b[key]) - (4 + 14)          # displacement from the centred place
            assert d.abs().max() <= 4
            seen |= set(d.flatten().tolist())
        # min(a + b, 255) on uint8: two dots on the same pixel give 255, never more
        merged = (b["x_a"] * 255 + b["x_b"] * 255).round().clamp(max=255) / 255
        assert torch.equal(b["x"], merged)
        same = (dot_position(b["x_a"]) == dot_position(b["x_b"])).all(1)
        assert torch.equal(b["x"].flatten(1).max(1).values == 1.0, same)  # 200+200 -> 255
        coincide += int(same.sum())
    assert seen == set(range(-4, 5))                     # every shift is drawn
    assert coincide > 0                                  # the clipped case did occur


def test_merge_clips_overlapping_ink_at_one():
    images = torch.full((20, 28, 28), 200, dtype=torch.uint8)   # every pixel lit in both digits
    stream = MultiTrainStream(ImageSet(images, torch.arange(20) % 10), 20, seed=0, shift=0)
    b = stream.batch(0, 0, 0)
    assert torch.all(b["x"][:, :, 4:32, 4:32] == 1.0)          # 200 + 200 clipped to 255
    assert torch.allclose(b["x_a"][:, :, 4:32, 4:32], torch.tensor(200 / 255))
    assert torch.all(b["x"][:, :, :4] == 0)                      # the canvas border stays black


def test_partner_is_uniform_over_the_other_classes_ends_included():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 1])
    ci = ClassIndex(labels, num_classes=3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    first = ci.partner(y, torch.zeros(6, dtype=torch.float64))
    last = ci.partner(y, torch.full((6,), 1 - 1e-12, dtype=torch.float64))
    assert (labels[first] != y).all() and (labels[last] != y).all()
    # class 0's others are classes 1 and 2 (5 digits): the extremes are the first 1 and last 2
    assert labels[first[0]] == 1 and labels[last[0]] == 2
    u = torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    picks = ci.partner(torch.zeros(4000, dtype=torch.long), u)
    counts = torch.bincount(picks, minlength=7)[[0, 2, 4, 5, 6]].float()
    assert counts.min() > 0.8 * 800 and counts.max() < 1.2 * 800  # 5 digits, ~800 each


def test_pairs_are_reproducible_from_seed_and_step_and_index():
    data = dot_digits()
    a = MultiTrainStream(data, 16, seed=7).batch(1, 2, 40)
    b = MultiTrainStream(data, 16, seed=7).batch(1, 2, 40)
    c = MultiTrainStream(data, 16, seed=7).batch(1, 2, 41)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x"], c["x"])                       # a fresh pair per draw
    src = MultiEvalSource(data, "test", per_digit=5, seed=1, default_limit=100)
    assert len(src) == 300
    whole = torch.cat([bt["x"] for bt in src.batches(300, 300)])
    pieces = torch.cat([bt["x"] for bt in src.batches(7, 300)])
    assert torch.equal(whole, pieces)                            # any batch size, same set
    assert sum(bt["x"].shape[0] for bt in src.batches(64)) == 100  # the default prefix
    idx = torch.tensor([299, 3, 150])
    assert torch.equal(src.get(idx)["x"], whole[idx])
    other = MultiEvalSource(data, "test", per_digit=5, seed=2)
    assert not torch.equal(other.get(idx)["x"], whole[idx])
    assert (src.get(torch.arange(300))["y"] == data.labels[torch.arange(300) % 60]).all()


def test_bbox_overlap_on_known_boxes():
    a = torch.zeros(1, 1, 10, 10)
    b = torch.zeros(1, 1, 10, 10)
    a[..., 0:4, 0:4] = 1          # 16 px box
    b[..., 2:4, 2:8] = 0.5        # 12 px box, 4 px of it inside a's
    o = bbox_overlap(a, b)
    assert o["of_smaller"].item() == pytest.approx(4 / 12)
    assert o["iou"].item() == pytest.approx(4 / 24)


def test_overlap_of_real_pairs_is_near_the_papers(mnist_root):
    images, labels = mnist.load_split(mnist_root, "test", False)
    data = ImageSet(torch.from_numpy(images[:2000].copy()), torch.from_numpy(labels[:2000]))
    stats = overlap_stats(MultiEvalSource(data, "test", 1, seed=0).batches(1000))
    assert stats["n"] == 2000
    assert 0.65 < stats["overlap_of_smaller"] < 0.80     # measured: 0.72 (ink boxes)
    assert 0.35 < stats["overlap_iou"] < 0.55
    assert expected_frame_overlap(4) == pytest.approx(0.7996, abs=1e-3)  # the paper's ~80%
    assert expected_frame_overlap(0) == 1.0


# --- loss, metric, models ---------------------------------------------------------------------

def test_two_label_loss_against_hand_values():
    lengths = torch.tensor([[0.95, 0.5, 0.3, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    batch = {"y": torch.tensor([1]), "y2": torch.tensor([0]),
             "x_a": torch.full((1, 1, 2, 2), 0.5), "x_b": torch.ones(1, 1, 2, 2)}
    recon = torch.zeros(1, 2, 4)
    recon[0, 0] = torch.tensor([0.5, 0.5, 0.5, 0.0])   # digit a: one pixel off by 0.5 -> 0.25
    recon[0, 1] = torch.tensor([1.0, 0.0, 1.0, 1.0])   # digit b: one pixel off by 1 -> 1.0
    margin_cfg = from_dict({"data": {"name": "multimnist"}}).loss
    out = multimnist_losses({"scores": lengths, "recon": recon}, batch, margin_cfg)
    # present 0 (0.95 > 0.9: 0) and 1 ((0.9-0.5)^2 = 0.16); absent 2 (0.5*(0.3-0.1)^2 = 0.02)
    assert out["margin"].item() == pytest.approx(0.16 + 0.02)
    assert out["reconstruction"].item() == pytest.approx(0.0005 * (0.25 + 1.0))
    assert out["total"].item() == pytest.approx(0.18 + 0.0005 * 1.25)
    with pytest.raises(ValueError, match="one reconstruction per digit"):
        multimnist_losses({"scores": lengths, "recon": recon[:, 0]}, batch, margin_cfg)
    # the CNN's BCE: logit 0 everywhere is log 2 per class
    bce = multilabel_bce_losses({"logits": torch.zeros(1, 10)}, batch)
    assert bce["total"].item() == pytest.approx(10 * np.log(2))


def test_exact_pair_and_at_least_one_on_crafted_predictions():
    scores = torch.tensor([[.9, .8, .1, 0, 0, 0, 0, 0, 0, 0],     # top2 {0,1}
                           [.9, .1, .8, 0, 0, 0, 0, 0, 0, 0],     # top2 {0,2}
                           [.1, .2, .0, .9, .8, 0, 0, 0, 0, 0]])  # top2 {3,4}
    y, y2 = torch.tensor([1, 0, 0]), torch.tensor([0, 1, 1])
    exact, one = pair_hits(scores, y, y2)
    assert exact.tolist() == [True, False, False]                # order of labels irrelevant
    assert one.tolist() == [True, True, False]
    batch = {"y": y, "y2": y2}
    pair, single = task_of(PAIR), task_of(SINGLE)
    assert pair.count_correct(scores, batch).item() == 1        # the exact pair, by task kind
    assert torch.equal(pair.model_labels(batch), torch.stack([y, y2], 1))
    assert single.count_correct(scores, batch).item() == 1    # top-1 = y: example 1 only
    assert torch.equal(single.model_labels(batch), y)


def test_capsnet_decodes_each_listed_capsule_on_its_own():
    cfg = tiny_config(model={"input_size": 36}, data={"name": "multimnist"})
    model = build_model(cfg.model).eval()
    assert model.num_primary == 2 * 10 * 10                      # 10x10 primary grid on 36x36
    x = torch.rand(3, 1, 36, 36)
    y = torch.tensor([[1, 4], [0, 9], [7, 2]])
    out = model(x, y)
    assert out["recon"].shape == (3, 2, 36 * 36)
    for k in range(2):
        assert torch.allclose(out["recon"][:, k], model(x, y[:, k])["recon"], atol=1e-6)


def test_paper_sized_models_have_the_expected_parameter_counts():
    caps = from_dict(yaml_of("multimnist-capsnet.yaml"))
    cnn = from_dict(yaml_of("multimnist-cnn.yaml"))
    assert count_parameters(build_model(caps.model)) == 11_361_808       # paper ~11.4M
    net = build_model(cnn.model)
    assert count_parameters(net) == 24_535_306                          # paper ~24.6M
    out = net.eval()(torch.rand(2, 1, 36, 36))
    assert out["scores"].shape == (2, 10) and (0 <= out["scores"]).all() <= 1


def yaml_of(name: str) -> dict:
    import yaml
    return yaml.safe_load((REPO / "configs" / name).read_text())


def test_config_requires_the_canvas_size():
    with pytest.raises(ConfigError, match="makes 36x36 images but model.input_size is 28; set "
                                          "model.input_size=36"):
        from_dict({"model": {"input_size": 28}, "data": {"name": "multimnist"}})
    with pytest.raises(ConfigError, match="set model.input_size=40"):
        from_dict({"model": {"input_size": 36}, "data": {"name": "multimnist", "pad": 6}})
    assert from_dict({"data": {"name": "multimnist"}}).model.input_size == 36   # followed
    assert from_dict({"data": {"name": "multimnist", "pad": 6}}).model.input_size == 40
    assert DATASETS["multimnist"].task == PAIR and PAIR in MODELS["capsnet"].losses
    cfg = from_dict(yaml_of("multimnist-capsnet.yaml"))
    assert cfg.optim.lr_decay_steps == 10 * from_dict({}).optim.lr_decay_steps


# --- end to end -------------------------------------------------------------------------------

def test_tiny_train_eval_and_segmentation_picture(tmp_path, fake_mnist):
    cfg = tiny_config(model={"input_size": 36, "transform_init_std": 0.1},
                      data={"name": "multimnist", "val_per_digit": 2, "test_limit": 96},
                      train={"max_steps": 6, "images_every_epoch": True}, optim={"lr": 0.01})
    folder = prepare_run_dir(tmp_path, "mm", force=False)
    summary = train(cfg, folder, CPU, data_root=str(fake_mnist), show_progress=False)
    assert summary["test_n"] == 96                                # the default test prefix
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in rows if "val/accuracy" in r)
    assert 0 <= val["val/accuracy"] <= val["val/at_least_one_accuracy"] <= 1
    assert 0.3 < val["val/bbox_overlap_of_smaller"] <= 1
    assert {"train/loss_margin", "train/loss_reconstruction"} <= set(rows[0])

    best = folder / "checkpoints" / "best.pt"
    r = CliRunner().invoke(app, ["eval", str(best), "--data-root", str(fake_mnist), "--json",
                                 "--limit", "128"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["dataset"] == "multimnist" and result["n"] == 128
    assert result["error"] == pytest.approx(1 - result["accuracy"])
    assert result["accuracy"] <= result["at_least_one_accuracy"]

    # the metric by hand on the same examples
    model, cfg2, _ = checkpoint.load_model(best, CPU)
    source = build_eval("multimnist", "test", cfg2, CPU, str(fake_mnist))
    assert source.task == PAIR and source.default_limit == 96
    batch = source.get(torch.arange(128))
    with torch.no_grad():
        top2 = model(batch["x"])["scores"].topk(2, 1).indices.sort(1).values
    pairs = torch.stack([batch["y"], batch["y2"]], 1).sort(1).values
    assert result["correct"] == int((top2 == pairs).all(1).sum())
    again = evaluate(model, source, 50, CPU, limit=128, loss_fn=loss_fn(cfg2, source.task))
    assert again["correct"] == result["correct"] and "loss_reconstruction" in again

    picture = task_of(PAIR).picture(model, source.get(torch.arange(8)), CPU, "fp32")
    assert picture.shape[0] == 3 and picture.shape[2] > picture.shape[1] > 3 * 36
    assert 0 <= picture.min() and picture.max() <= 1
    # example 0's second picture: red = the longest capsule's digit, green = the second's
    with torch.no_grad():
        x0 = source.get(torch.arange(1))["x"]
        top = model(x0)["scores"].topk(2, 1).indices
        recon = model(x0, top)["recon"].view(2, 36, 36)
    top_left = GAP + 3 * 36 + GAP
    tile = picture[:, top_left:top_left + 3 * 36:3, GAP:GAP + 3 * 36:3]
    assert torch.allclose(tile[0], recon[0], atol=1 / 255)
    assert torch.allclose(tile[1], recon[1], atol=1 / 255)
    assert tile[2].abs().max() == 0
    save_png(picture, tmp_path / "seg.png")
    assert (tmp_path / "seg.png").read_bytes()[:4] == b"\x89PNG"
