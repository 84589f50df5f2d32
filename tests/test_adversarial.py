"""Adversarial attacks and detection by reconstruction (capsctl/adversarial, `capsctl attack`,
`capsctl calibrate`, predict's unusual flag): the attacks stay in the eps ball and in [0, 1],
raise the loss, and equal a written-out loop of each; the detector's threshold flags 5% of
held-out clean images; AUROC equals its definition; the threshold is kept in best.pt by
training and in older checkpoints by calibrate, with nothing else changed; errors are one
line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from capsctl import checkpoint
from capsctl.adversarial.attacks import METHODS, Attack, cw_margin, frozen, perturb, \
    random_targets
from capsctl.adversarial.detector import DETECTOR_KEY, Detector, auroc, calibrate, l2_distance
from capsctl.models import build_model
from capsctl.models.registry import MODELS, class_loss_fn
from conftest import tiny_config, write_fake_mnist, cli, one_line_error

CPU = torch.device("cpu")
TINY_CNN = {"name": "cnn", "channels": [4, 4], "hidden": [16, 12], "decoder": True,
            "decoder_hidden": [16, 32]}


def model_and_loss(model_section: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(model=model_section)
    return build_model(cfg.model).eval(), class_loss_fn(cfg), cfg


def batch(n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


FAMILIES = {"capsnet": {"transform_init_std": 0.1}, "cnn": TINY_CNN}


# --- the attacks --------------------------------------------------------------------------------

def test_every_one_label_family_has_a_class_loss():
    for name, spec in MODELS.items():
        assert (spec.class_loss is None) == (name == "multimnist-cnn"), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_attacks_stay_in_the_ball_and_raise_the_loss(family, method):
    model, loss, _ = model_and_loss(FAMILIES[family])
    x, y = batch()
    eps = 0.1
    with frozen(model):
        x_adv = perturb(model, loss, x, y, Attack(method, eps, steps=5),
                        generator=torch.Generator().manual_seed(0))
        before = loss(model(x)["scores"], y)
        after = loss(model(x_adv)["scores"], y)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()
    if method == "cw":      # it ascends the margin, not the loss
        with torch.no_grad():
            assert cw_margin(model(x_adv)["scores"], y).mean() > \
                cw_margin(model(x)["scores"], y).mean()
    else:
        assert after.mean() > before.mean(), (before.mean(), after.mean())
    assert all(p.requires_grad for p in model.parameters())     # unfrozen afterwards


def reference(model, loss, x, y, method, eps, steps, alpha, start=None):
    """The attacks written out on their own: clip with clamp per pixel, loss.backward()."""
    x_adv = x.clone() if start is None else start.clone()
    for _ in range(1 if method == "fgsm" else steps):
        x_adv = x_adv.clone().requires_grad_(True)
        model.zero_grad()
        scores = model(x_adv)["scores"]
        if method == "cw":
            s = scores.float()
            true = s[torch.arange(len(y)), y]
            others = s.clone()
            others[torch.arange(len(y)), y] = -1e30
            objective = (others.max(1).values - true).sum()
        else:
            objective = loss(scores, y).sum()
        objective.backward()
        step = eps if method == "fgsm" else alpha
        x_adv = x_adv.detach() + step * x_adv.grad.sign()
        x_adv = torch.clamp(torch.clamp(x_adv, x - eps, x + eps), 0, 1)
    return x_adv


@pytest.mark.parametrize("method", METHODS)
def test_attacks_equal_a_written_out_loop(method):
    model, loss, _ = model_and_loss(TINY_CNN)
    x, y = batch(8)
    eps, steps = 0.2, 4
    attack = Attack(method, eps, steps=steps)
    start = None
    if method == "pgd":          # the same random start: the generator's first draw
        noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
        start = torch.clamp(torch.clamp(x + (2 * noise - 1) * eps, x - eps, x + eps), 0, 1)
    want = reference(model, loss, x, y, method, eps, steps, 2.5 * eps / steps, start)
    with frozen(model):
        got = perturb(model, loss, x, y, attack, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


def test_targeted_attacks_move_towards_the_target():
    model, loss, _ = model_and_loss(TINY_CNN)
    x, y = batch(16)
    target = random_targets(y, 10, torch.Generator().manual_seed(0))
    assert (target != y).all() and target.max() < 10
    with frozen(model):
        x_adv = perturb(model, loss, x, y, Attack("pgd", 0.3, 10, targeted=True), "fp32",
                        target, torch.Generator().manual_seed(0))
        before = F.cross_entropy(model(x)["scores"], target, reduction="none")
        after = F.cross_entropy(model(x_adv)["scores"], target, reduction="none")
    assert after.mean() < before.mean()
    with pytest.raises(ValueError):
        perturb(model, loss, x, y, Attack("fgsm", 0.1, targeted=True))


def test_cw_margin_is_best_other_minus_true():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]])
    got = cw_margin(scores, torch.tensor([1, 2]))
    assert torch.allclose(got, torch.tensor([0.2 - 0.7, 0.5 - 0.4]))


# --- the detector -------------------------------------------------------------------------------

def test_auroc_is_the_chance_a_positive_beats_a_negative():
    g = torch.Generator().manual_seed(0)
    neg = torch.randint(0, 20, (300,), generator=g).double()      # many ties
    pos = torch.randint(5, 30, (200,), generator=g).double()
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :])
    assert auroc(neg, pos) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert auroc(torch.zeros(3), torch.ones(2)) == 1.0
    assert auroc(torch.zeros(0), torch.ones(2)) is None


class Images:
    """A minimal evaluation source over a tensor of images (what calibrate reads)."""

    task = "single"

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size, limit=None):
        n = len(self.x) if limit is None else min(limit, len(self.x))
        for s in range(0, n, batch_size):
            yield {"x": self.x[s:min(s + batch_size, n)],
                   "y": torch.zeros(min(batch_size, n - s), dtype=torch.long)}


def test_the_threshold_flags_five_percent_of_held_out_clean_images():
    model, _, _ = model_and_loss({"transform_init_std": 0.1})
    g = torch.Generator().manual_seed(3)
    clean = (torch.rand(4000, 1, 28, 28, generator=g) * 0.3) ** 2     # one distribution
    d = calibrate(model, Images(clean[:2000]), "mnist", "val", 500, CPU, "fp32")
    assert d.quantile == 0.95 and d.n == 2000
    with torch.no_grad():
        out = model(clean[2000:])
    fpr = float((l2_distance(clean[2000:], out["recon"]) > d.threshold).double().mean())
    # binomial sampling error of 2000 held-out images at p = 0.05: sd 0.0049; 4 sd
    assert abs(fpr - 0.05) < 0.02, fpr


# --- training, calibrate, attack, predict ----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CapsNet trained a few steps on synthetic MNIST: (best.pt, data root)."""
    from capsctl.training import train

    base = tmp_path_factory.mktemp("adversarial")
    root = write_fake_mnist(base / "mnist", n_train=320)
    cfg = tiny_config(optim={"lr": 0.01}, model={"transform_init_std": 0.1},
                      data={"val_size": 64}, train={"max_steps": 24, "epochs": 2})
    summary = train(cfg, base / "run", CPU, data_root=str(root), show_progress=False,
                    console=Console(file=io.StringIO()))
    return Path(summary["best_checkpoint"]), root, summary


def test_training_keeps_the_detector_in_best_pt(trained):
    best, _, summary = trained
    d = Detector.of(checkpoint.load(best))
    assert d is not None and d.split == "val" and d.n == 64 and d.quantile == 0.95
    assert summary["detector"]["threshold"] == d.threshold > 0


def test_calibrate_adds_the_detector_and_changes_nothing_else(trained, tmp_path):
    best, root, _ = trained
    copy = tmp_path / "old.pt"
    state = checkpoint.load(best)
    state.pop(DETECTOR_KEY)
    checkpoint.save(copy, state)
    r = cli("calibrate", copy, "--data-root", root, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert DETECTOR_KEY not in checkpoint.load(copy)                   # dry run: untouched
    r = cli("calibrate", copy, "--data-root", root, "--quantile", "0.9", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    after = checkpoint.load(copy)
    assert after[DETECTOR_KEY] == got["detector"] and got["detector"]["quantile"] == 0.9
    assert set(after) == set(state) | {DETECTOR_KEY, "format_version"}
    for k, v in state["model"].items():
        assert torch.equal(after["model"][k], v)
    assert after["config"] == state["config"] and after["step"] == state["step"]


def test_attack_cli_reports_accuracy_and_detection(trained, tmp_path):
    best, root, _ = trained
    r = cli("attack", best, "--data-root", root, "--method", "fgsm,pgd", "--eps", "8,32",
            "--steps", "3", "--limit", "32", "--json", "--png", tmp_path / "a.png",
            "--curve", tmp_path / "c.png", "--roc", tmp_path / "r.png")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["eps_unit"] == "/255"
    (run,) = result["runs"]
    assert run["detector_source"] == "checkpoint" and run["n"] == 32
    assert [(a["method"], round(a["eps"] * 255)) for a in run["attacks"]] == \
        [("fgsm", 8), ("fgsm", 32), ("pgd", 8), ("pgd", 32)]
    for a in run["attacks"]:
        assert a["max_linf"] <= a["eps"] + 1e-6
        assert a["accuracy"] <= run["clean_accuracy"] + 1e-9
        for key in ("detection_rate", "false_positive_rate", "auroc",
                    "undetected_success_rate", "cycle_detection_rate"):
            assert key in a
        if a["successes"]:
            assert a["undetected_success_rate"] <= a["success_rate"]
    for name in ("a.png", "c.png", "r.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_predict_marks_unusual_inputs(trained, tmp_path):
    import numpy as np

    best, _, _ = trained
    d = Detector.of(checkpoint.load(best))
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    blank = tmp_path / "blank.npy"
    np.save(blank, np.zeros((28, 28), np.uint8))
    r = cli("predict", best, noise, blank, "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    for row in rows:
        assert row["unusual"] == (row["distance"] > d.threshold)
    assert rows[0]["unusual"]                 # uniform noise is far from any digit
    r = cli("predict", best, noise)
    assert r.exit_code == 0 and "unusual" in r.output


def test_cnn_with_a_decoder_reconstructs_and_without_does_not():
    model, _, cfg = model_and_loss(TINY_CNN)
    x, y = batch(4)
    out = model(x, y)
    assert model.has_decoder and out["recon"].shape == (4, 784)
    from capsctl.models.registry import loss_fn
    losses = loss_fn(cfg, "single")(out, {"x": x, "y": y})
    assert set(losses) == {"cross_entropy", "reconstruction", "total"}
    plain, _, _ = model_and_loss({**TINY_CNN, "decoder": False})
    assert not plain.has_decoder and "recon" not in plain(x)


def test_attack_and_calibrate_errors_are_one_line(trained, tmp_path):
    best, root, _ = trained
    one_line_error(cli("attack", best, "--method", "deepfool"), "--method")
    one_line_error(cli("attack", best, "--eps", "-1"), "--eps")
    one_line_error(cli("attack", best, "--eps", "300"), "--eps")
    one_line_error(cli("attack", best, "--eps", "a,b"), "--eps")
    one_line_error(cli("attack", best, "--steps", "0"), "--steps")
    one_line_error(cli("attack", best, "--png", tmp_path), "--png")
    one_line_error(cli("attack", tmp_path / "missing.pt"), "not found")
    one_line_error(cli("calibrate", best, "--quantile", "1.5", "--data-root", root),
                   "--quantile")
    cfg = tiny_config(model={**TINY_CNN, "decoder": False})
    plain = tmp_path / "plain.pt"
    from capsctl.config import to_dict
    checkpoint.save(plain, {"model": build_model(cfg.model).state_dict(),
                            "config": to_dict(cfg), "step": 0})
    one_line_error(cli("calibrate", plain, "--data-root", root), "decoder")


def test_a_model_without_a_decoder_is_attacked_without_a_detector(trained, tmp_path):
    _, root, _ = trained
    cfg = tiny_config(model={**TINY_CNN, "decoder": False})
    plain = tmp_path / "plain.pt"
    from capsctl.config import to_dict
    checkpoint.save(plain, {"model": build_model(cfg.model).state_dict(),
                            "config": to_dict(cfg), "step": 0})
    r = cli("attack", plain, "--data-root", root, "--method", "bim", "--eps", "0.1",
            "--steps", "2", "--limit", "16", "--json")
    assert r.exit_code == 0, r.output
    (run,) = json.loads(r.stdout)["runs"]
    assert run["detector"] is None and run["detector_source"] == "no decoder"
    (row,) = run["attacks"]
    assert row["label"] == "bim-2" and "detection_rate" not in row
    assert row["max_linf"] <= 0.1 + 1e-6
