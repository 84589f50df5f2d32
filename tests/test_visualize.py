"""reconstruct / perturb / routes: the pictures' geometry, the numbers behind them, and the CLI
run from a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from capsctl import checkpoint
from capsctl.cli import app
from capsctl.config import to_dict
from capsctl.errors import CapsctlError
from capsctl.models import build_model
from capsctl.visualize import (dimension_change, offsets_for, pair_grid, perturbations,
                               reconstruct_batch, reconstruction_figure, routing_maps, tile)
from conftest import tiny_config, write_fake_mnist

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _model(**model):
    torch.manual_seed(0)
    cfg = tiny_config(model={"transform_init_std": 0.3, **model})
    return build_model(cfg.model).eval(), cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(run folder with checkpoints/best.pt, fake MNIST root); weights random but fixed."""
    base = tmp_path_factory.mktemp("vis")
    root = write_fake_mnist(base / "mnist")
    model, cfg = _model()
    checkpoint.save(base / "run" / "checkpoints" / "best.pt",
                    {"model": model.state_dict(), "config": to_dict(cfg), "step": 7})
    return base / "run", root


def test_pair_grid_keeps_its_shape_contract():
    x, r = torch.rand(5, 1, 28, 28), torch.rand(5, 784)
    g = pair_grid(x, r, scale=2)
    assert g.shape == (3, (2 * 29 + 1) * 2, (5 * 29 + 1) * 2)
    assert 0 <= float(g.min()) and float(g.max()) <= 1


def test_tile_is_a_nearest_upscale():
    img = torch.rand(1, 4, 5)
    t = torch.from_numpy(__import__("numpy").asarray(tile(img, 3)).copy())
    assert t.shape == (12, 15, 3)
    expect = (img[0].clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(t[1::3, 1::3, 0], expect)          # every 3x3 block is one pixel
    assert torch.equal(t[::3, ::3, 1], t[2::3, 2::3, 2])  # grey: equal channels, constant blocks


def test_reconstruction_grid_size_follows_cells():
    x, r = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    y, p = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 3, 4, 9])
    one = reconstruction_figure(x, r, y, p, [[0, 1, 2]], None, ["t"], scale=2)
    two = reconstruction_figure(x, r, y, p, [[0, 1, 2, 3]], None, ["t"], scale=2)
    rows = reconstruction_figure(x, r, y, p, [[0, 1, 2], [3, 4, 5]], None, ["t"], scale=2)
    big = reconstruction_figure(x, r, y, p, [[0, 1, 2]], None, ["t"], scale=3)
    assert one.shape[0] == 3 and one.min() >= 0 and one.max() <= 1
    assert two.shape[2] - one.shape[2] == 28 * 2 + 1          # one more cell + its border
    cell_h = 2 * 56 + 1 + 15
    assert rows.shape[1] - one.shape[1] == cell_h + 1          # one more row of cells
    assert big.shape[2] - one.shape[2] == 3 * 28               # three cells 28 px wider
    # the mistake (y 5, p 9) is framed in red: some pure-red-ish pixels appear only then
    red = lambda im: ((im[0] > 0.9) & (im[1] < 0.4) & (im[2] < 0.4)).sum()  # noqa: E731
    assert red(rows) > red(reconstruction_figure(x, r, y, y, [[0, 1, 2], [3, 4, 5]], None,
                                                 ["t"], scale=2))


def test_zero_offset_column_is_the_plain_reconstruction():
    model, cfg = _model()
    x = torch.rand(3, 1, 28, 28)
    recon, pred, _ = reconstruct_batch(model, x, torch.tensor([1, 2, 3]))
    with torch.no_grad():
        v = model(x)["v"]
    offsets = offsets_for(0.25, 0.05)
    assert offsets.numel() == 11 and offsets[5] == 0 and abs(float(offsets[0]) + 0.25) < 1e-7
    for b in range(3):
        grid = perturbations(model, v[b], int(pred[b]), offsets)
        assert grid.shape == (cfg.model.class_dim, 11, 784)
        for d in range(cfg.model.class_dim):
            torch.testing.assert_close(grid[d, 5], recon[b].flatten(), atol=1e-6, rtol=0)


def test_each_row_changes_only_its_own_dimension():
    model, cfg = _model()
    D, J = cfg.model.class_dim, cfg.model.num_classes
    x = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        v_JD = model(x)["v"][0]
    seen = []
    hook = model.decoder.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    offsets = offsets_for(0.2, 0.1)
    try:
        grid = perturbations(model, v_JD, 4, offsets)
    finally:
        hook.remove()
    inputs = seen[0].view(D, len(offsets), J, D)          # what the decoder was given
    masked = torch.zeros(J, D)
    masked[4] = v_JD[4]
    for d in range(D):
        for k, o in enumerate(offsets.tolist()):
            diff = inputs[d, k] - masked
            expect = torch.zeros(J, D)
            expect[4, d] = o
            torch.testing.assert_close(diff, expect, atol=1e-6, rtol=0)
    change = dimension_change(grid)
    assert change.shape == (D,) and bool((change > 0).all())
    # offsets of one dimension change the picture; the zero column of every row is identical
    for d in range(D):
        torch.testing.assert_close(grid[d, 2], grid[0, 2], atol=1e-7, rtol=0)


def test_offsets_must_divide_the_range():
    with pytest.raises(CapsctlError, match="multiple"):
        offsets_for(0.25, 0.1)
    with pytest.raises(CapsctlError):
        offsets_for(0.25, 0)


def test_couplings_sum_to_one_over_parents_at_every_pass():
    model, cfg = _model(routing_iterations=3, transform_init_std=2.0)
    x = torch.rand(2, 1, 28, 28)
    maps = routing_maps(model, x)
    T, H, W = model.routing_layout
    c = maps["coupling"]
    assert c.shape == (2, 3, T * H * W, cfg.model.num_classes)
    torch.testing.assert_close(c.sum(-1), torch.ones(2, 3, T * H * W))
    torch.testing.assert_close(maps["coupling_grid"].sum(2), torch.ones(2, 3, H, W))
    torch.testing.assert_close(c[:, 0], torch.full_like(c[:, 0], 0.1))   # b starts at zero
    assert float((c[:, 2] - c[:, 0]).abs().max()) > 1e-4                   # routing moved it
    # the grid maps child i = (type, row, col) to its position
    t, h, w, j = 1, 2, 3, 5
    expect = c[0, 2].view(T, H, W, -1)[:, h, w, j].mean()
    torch.testing.assert_close(maps["coupling_grid"][0, 2, j, h, w], expect)
    assert float(c[0, 2, t * H * W + h * W + w].sum()) == pytest.approx(1.0, abs=1e-5)
    # agreement u_hat . v, computed independently from the model's parts
    with torch.no_grad():
        u = model.primary(F.relu(model.conv1(x)))
        a = torch.einsum("bijd,bjd->bij", model.digits.predictions(u), model(x)["v"])
    torch.testing.assert_close(maps["agreement"], a, atol=1e-5, rtol=1e-4)


def test_a_model_without_routing_is_refused():
    with pytest.raises(CapsctlError, match="routing"):
        routing_maps(torch.nn.Linear(2, 2), torch.rand(1, 2))


def _png(path):
    with Image.open(path) as im:
        im.load()
        return im.mode, im.size


def test_cli_reconstruct_perturb_routes_from_a_tiny_checkpoint(tiny_run, tmp_path):
    run, root = tiny_run
    ck = run / "checkpoints" / "best.pt"
    r = cli("reconstruct", ck, "--data-root", root, "--n", "3")
    assert r.exit_code == 0, r.output
    mode, (w, h) = _png(run / "reconstruct.png")             # default: the run folder
    assert mode == "RGB" and h > 10 * 2 * 56                 # ten class rows of pairs
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())

    out = tmp_path / "plain.png"
    r = cli("reconstruct", ck, "--data-root", root, "--indices", "0,5", "--indices", "9",
            "--mask", "label", "--out", out, "--tb", tmp_path / "tb")
    assert r.exit_code == 0, r.output
    assert _png(out)[0] == "RGB" and "3 (mnist test)" in r.stdout
    assert any((tmp_path / "tb").iterdir())

    out = tmp_path / "perturb.png"
    r = cli("perturb", ck, "--data-root", root, "--index", "2", "--label", "--out", out,
            "--no-tb", "--range", "0.2", "--step", "0.1")
    assert r.exit_code == 0, r.output
    assert _png(out)[0] == "RGB"
    rows = [line.split() for line in r.stdout.splitlines()]
    table = [row for row in rows if len(row) == 2 and row[0].isdigit()
             and row[1].replace(".", "").isdigit()]
    assert [int(row[0]) for row in table] == list(range(6))  # one line per dimension

    r = cli("perturb", ck, "--data-root", root, "--out", tmp_path / "all.png", "--no-tb")
    assert r.exit_code == 0, r.output
    assert "mean" in r.stdout and _png(tmp_path / "all.png")[1][0] > 1000   # ten panels

    out = tmp_path / "routes.png"
    r = cli("routes", ck, "--data-root", root, "--index", "4", "--out", out, "--no-tb",
            "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)                              # exactly one JSON object
    assert data["index"] == 4 and data["layout"] == {"types": 2, "height": 6, "width": 6}
    assert len(data["coupling"]) == 3 and len(data["coupling"][0]) == 72
    assert all(abs(sum(row) - 1) < 1e-3 for p in data["coupling"] for row in p)
    assert len(data["agreement_total"]) == 10
    assert _png(out)[1] == (data["size"][1], data["size"][0])


def test_cli_one_line_errors(tiny_run, tmp_path):
    run, root = tiny_run
    model, cfg = _model(decoder=False)
    ck = tmp_path / "nodec.pt"
    checkpoint.save(ck, {"model": model.state_dict(), "config": to_dict(cfg)})
    for cmd in ("reconstruct", "perturb"):
        r = cli(cmd, ck, "--data-root", root, "--no-tb", "--out", tmp_path / "x.png")
        assert r.exit_code == 2, r.output
        assert "decoder" in r.output and len(r.output.strip().splitlines()) == 1
    # routes needs no decoder
    r = cli("routes", ck, "--data-root", root, "--no-tb", "--out", tmp_path / "r.png")
    assert r.exit_code == 0, r.output
    good = run / "checkpoints" / "best.pt"
    for args in (["perturb", good, "--range", "0.25", "--step", "0.1"],
                 ["routes", good, "--index", "64"],
                 ["reconstruct", good, "--mask", "guess"],
                 ["perturb", good, "--digit", "12"]):
        r = cli(*args, "--data-root", root, "--no-tb", "--out", tmp_path / "y.png")
        assert r.exit_code == 2, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1


def test_matrix_capsules_use_the_same_contract():
    """An EM-routed model: routes reads routing_layout + out["routing"]; perturb decodes poses."""
    model, cfg = _model(name="em-capsnet")
    x = torch.rand(2, 1, 28, 28)
    maps = routing_maps(model, x)
    T, H, W = model.routing_layout
    c = maps["coupling"]
    assert c.shape[2:] == (T * H * W, cfg.model.num_classes) and "agreement" not in maps
    torch.testing.assert_close(c.sum(-1), torch.ones(c.shape[:3]), atol=1e-5, rtol=0)
    recon, pred, _ = reconstruct_batch(model, x, torch.tensor([0, 1]))
    with torch.no_grad():
        pose = model(x)["pose"]
    grid = perturbations(model, pose[0], int(pred[0]), offsets_for(0.1, 0.05))
    torch.testing.assert_close(grid[:, 2], recon[0].flatten().expand(16, -1), atol=1e-6, rtol=0)
