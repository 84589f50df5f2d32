"""data.augment: efficient-capsnet - the authors' four steps (rotate, shift within the margins,
squish, erase), each checked against what it must do; the draws' distribution; the stream's
replay (what exact resume needs); the config's rules; a tiny training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from capsctl.config import from_dict
from capsctl.data import efficient_capsnet_augment as A
from capsctl.data.datasets import ImageSet, TrainStream
from capsctl.errors import ConfigError
from conftest import tiny_config


def test_the_squish_resize_is_pils_antialiased_lanczos3():
    """PIL's LANCZOS resize (float image) is the same filter as TensorFlow's antialiased
    LANCZOS3: sinc(x) sinc(x/3), stretched when shrinking, half-pixel centres, normalised."""
    img = np.random.default_rng(0).random((28, 28)).astype(np.float32)
    for w in range(1, 8):
        ref = np.asarray(Image.fromarray(img, mode="F").resize((28 - w, 28), Image.LANCZOS))
        ours = (torch.from_numpy(img).double() @ A.resize_matrix(28, 28 - w).T).numpy()
        assert np.abs(ref - ours).max() < 1e-6, w


def test_the_squish_places_and_crops_the_resized_columns():
    table = A.squish_table()
    ones = torch.ones(7 * 2, 1, 28, 28)
    w = torch.arange(1, 8).repeat_interleave(2)
    extra = torch.tensor([0, 1] * 7)
    out = A.squish(ones, w, extra, table)
    for i in range(14):
        start = int(w[i]) // 2 + int(extra[i])
        end = min(start + 28 - int(w[i]), 28)
        cols = out[i, 0, 0]
        assert torch.allclose(cols[start:end], torch.ones(end - start), atol=1e-6), i
        assert cols[:start].abs().sum() == 0 and cols[end:].abs().sum() == 0


def test_rotation_turns_counter_clockwise_about_pixel_14_14_and_zero_is_identity():
    x = torch.zeros(3, 1, 28, 28)
    x[:, 0, 14, 20] = 1.0                       # six columns right of the centre
    x[2] = torch.rand(1, 28, 28)
    out = A.rotate(x, torch.tensor([90.0, -90.0, 0.0]))
    assert (out[0, 0] > 0.99).nonzero().tolist() == [[8, 14]]    # now six rows above it
    assert (out[1, 0] > 0.99).nonzero().tolist() == [[20, 14]]
    assert torch.equal(out[2], x[2])
    assert torch.allclose(out[:2].sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)


def test_shift_moves_whole_pixels_within_the_margins():
    x = torch.zeros(4, 1, 28, 28)
    x[:, 0, 10:13, 5:9] = torch.arange(1, 13, dtype=torch.float32).view(3, 4)
    # margins: top 10, bottom 15, left 5, right 19
    dirs = torch.tensor([[0, 0], [1, 1], [0, 1], [1, 0]])        # (row dir, column dir)
    amts = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 0.9999], [0.9999, 0.9999]])  # (row, col)
    out = A.shift(x, dirs, amts)
    # rows: floor(-0.5 * 10) = -5, floor(0.5 * 16) = 8, floor(-0 * 10) = 0, floor(0.9999 * 16) = 15
    # columns: floor(-0.5 * 5) = -3, floor(0.5 * 20) = 10, floor(0.9999 * 20) = 19,
    #          floor(-0.9999 * 5) = -5
    for i, (dy, dx) in enumerate([(-5, -3), (8, 10), (0, 19), (15, -5)]):
        assert torch.equal(out[i, 0], torch.roll(x[i, 0], (dy, dx), dims=(0, 1))), i
        assert out[i].sum() == x[i].sum()
    blank = torch.zeros(1, 1, 28, 28)
    assert torch.equal(A.shift(blank, dirs[:1], amts[:1]), blank)


def test_erase_zeroes_one_4x4_patch():
    x = torch.ones(2, 1, 28, 28)
    out = A.erase(x, torch.tensor([[4, 22], [22, 4]]))
    assert int((out == 0).sum()) == 32
    assert out[0, 0, 4:8, 22:26].abs().max() == 0 and out[1, 0, 22:26, 4:8].abs().max() == 0


def test_the_draws_follow_the_authors_distributions():
    p = A.draw(40_000, torch.Generator().manual_seed(1), "cpu")
    rotated = p["angle"] != 0
    assert 0.46 < rotated.float().mean() < 0.50         # half, less the draws truncated to 0
    assert p["angle"].abs().max() <= 29 and torch.equal(p["angle"], p["angle"].round())
    assert set(p["shift_dir"].unique().tolist()) == {0, 1}
    assert 0 <= p["shift_amt"].min() and p["shift_amt"].max() < 1
    w = p["squish_w"]
    assert w.min() == 1 and w.max() <= 7 and (w == 1).float().mean() > (w == 3).float().mean()
    assert set(p["squish_extra"].unique().tolist()) == {0, 1}
    assert p["erase"].min() == 4 and p["erase"].max() == 22


def test_the_stream_replays_a_step_exactly_and_draws_afresh_for_the_next():
    data = ImageSet(torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8),
                    torch.arange(64) % 10)

    def stream():
        return TrainStream(data, 16, seed=3, augment=A.EfficientCapsNetAugment())

    a, b = stream().batch(0, 1, 5), stream().batch(0, 1, 5)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert a["x"].shape == (16, 1, 28, 28) and a["x"].dtype == torch.float32
    assert not torch.equal(a["x"], stream().batch(0, 1, 6)["x"])


def test_the_config_rules():
    cfg = from_dict({"data": {"name": "mnist", "augment": "efficient-capsnet", "shift": 0}})
    assert cfg.data.augment == "efficient-capsnet"
    assert from_dict({}).data.augment == "shift"
    with pytest.raises(ConfigError, match="set data.shift=0"):
        from_dict({"data": {"name": "mnist", "augment": "efficient-capsnet"}})
    with pytest.raises(ConfigError, match="must be one of shift, efficient-capsnet"):
        from_dict({"data": {"name": "mnist", "augment": "rotate"}})
    with pytest.raises(ConfigError, match="augment"):
        from_dict({"data": {"name": "fashion-mnist", "augment": "efficient-capsnet"}})


def test_a_tiny_run_trains_with_it(tmp_path, fake_mnist):
    from capsctl.training.loop import train

    cfg = tiny_config(data={"augment": "efficient-capsnet", "shift": 0},
                      train={"epochs": 1})
    result = train(cfg, tmp_path / "run", torch.device("cpu"), data_root=str(fake_mnist),
                   show_progress=False)
    assert "augment: efficient-capsnet" in (tmp_path / "run" / "config.yaml").read_text()
    assert (result["steps"], result["test_n"]) == (14, 64), result
