"""reconstruct / perturb / routes: the pictures' geometry, the numbers behind them, the CLI run
from a tiny checkpoint, and bad options refused in one line before anything is written."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from capsctl import checkpoint, tasks
from capsctl.cli import app
from capsctl.config import to_dict
from capsctl.errors import CapsctlError
from capsctl.inspection import commands, draw
from capsctl.inspection.draw import tile
from capsctl.inspection.figures import GAP, pair_grid, reconstruction_figure, segmentation_grid
from capsctl.inspection.probe import (dimension_change, offsets_for, perturbations,
                                   reconstruct_batch, routing_maps, routing_statistics)
from capsctl.models import build_model
from conftest import REPO, tiny_config, write_fake_mnist

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _model(**model):
    torch.manual_seed(0)
    if model.get("name", "capsnet") == "capsnet":
        model = {"transform_init_std": 0.3, **model}
    cfg = tiny_config(model=model)
    return build_model(cfg.model).eval(), cfg


def _save(path, model, cfg, step=7):
    checkpoint.save(path, {"model": model.state_dict(), "config": to_dict(cfg), "step": step})
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(run folder with checkpoints/best.pt, fake MNIST root); weights random but fixed."""
    base = tmp_path_factory.mktemp("vis")
    root = write_fake_mnist(base / "mnist")
    _save(base / "run" / "checkpoints" / "best.pt", *_model())
    return base / "run", root


def test_pair_grid_keeps_its_shape_contract():
    x, r = torch.rand(5, 1, 28, 28), torch.rand(5, 784)
    g = pair_grid(x, r, scale=2)
    assert g.shape == (3, (2 * 29 + 1) * 2, (5 * 29 + 1) * 2)
    assert 0 <= float(g.min()) and float(g.max()) <= 1


def test_tile_is_a_nearest_upscale():
    img = torch.rand(1, 4, 5)
    t = torch.from_numpy(np.asarray(tile(img, 3)).copy())
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


@pytest.mark.parametrize("range_, step", [(float("inf"), 0.05), (0.25, float("inf")),
                                          (float("nan"), 0.05), (0.25, float("nan")),
                                          (-0.25, 0.05), (0.25, -0.05), (1e308, 1e-308),
                                          (10.0, 0.05), (0.25, 1e-9)])
def test_offsets_are_finite_positive_and_at_most_101(range_, step):
    with pytest.raises(CapsctlError) as e:
        offsets_for(range_, step)
    assert "\n" not in str(e.value)
    assert offsets_for(2.5, 0.05).numel() == 101                 # the largest allowed


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
    model, _ = _model(name="cnn", channels=[4], hidden=[8])
    assert model.routing_layout is None
    with pytest.raises(CapsctlError, match="routing"):
        routing_maps(model, torch.rand(1, 1, 28, 28))


def test_inspection_reads_models_only_through_the_contract():
    """No attribute or key probing: the declared capsule_key / has_decoder / routing_layout /
    routing_label / decode and the source's task say what a model and a batch have."""
    for path in sorted((REPO / "capsctl" / "inspection").glob("*.py")):
        text = path.read_text()
        for pattern in (r"\bgetattr\(", r"\bhasattr\(", r"\"y2\" in", r"\"v\" in",
                        r"\"pose\" in", r"\.(decoder|primary|digits)\b(?!:)",
                        r"name == \"(multimnist|em-capsnet)\""):
            assert not re.search(pattern, text), f"{path.name}: {pattern}"


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
    ck = _save(tmp_path / "nodec.pt", *_model(decoder=False))
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
    assert not (tmp_path / "y.png").exists()


def test_a_cnn_checkpoint_is_refused_in_one_line(tiny_run, tmp_path):
    _, root = tiny_run
    ck = _save(tmp_path / "cnn.pt", *_model(name="cnn", channels=[4], hidden=[8]))
    for cmd, words in (("reconstruct", "decoder"), ("perturb", "decoder"), ("routes", "routing")):
        r = cli(cmd, ck, "--data-root", root, "--no-tb", "--out", tmp_path / "x.png")
        assert r.exit_code == 2 and words in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def _refused(args, out, *more):
    """Run a command that must fail in one line (exit 2) and leave ``out`` unwritten."""
    r = cli(*args, "--out", out, *more)
    assert r.exit_code == 2, (args, r.output)
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output
    assert not out.exists(), args
    return r.output


@pytest.mark.parametrize("cmd", ["reconstruct", "perturb", "routes"])
@pytest.mark.parametrize("scale", ["100000", "0", "-1", "17"])
def test_scale_is_bounded(tiny_run, tmp_path, cmd, scale):
    run, root = tiny_run
    ck = run / "checkpoints" / "best.pt"
    message = _refused([cmd, ck, "--data-root", root, "--no-tb", "--index" if cmd != "reconstruct"
                        else "--n", "1", "--scale", scale], tmp_path / "x.png")
    assert "--scale" in message and "16" in message


@pytest.mark.parametrize("range_, step", [("inf", "0.05"), ("0.25", "inf"), ("nan", "0.05"),
                                          ("1e308", "1e-308"), ("100", "0.05")])
def test_perturb_range_and_step_are_finite_with_bounded_columns(tiny_run, tmp_path, range_,
                                                                 step):
    run, root = tiny_run
    _refused(["perturb", run / "checkpoints" / "best.pt", "--data-root", root, "--index", "1",
              "--no-tb", "--range", range_, "--step", step], tmp_path / "x.png")


@pytest.mark.parametrize("cmd", ["reconstruct", "perturb", "routes"])
def test_a_bad_tb_target_is_refused_before_the_png_is_written(tiny_run, tmp_path, cmd):
    run, root = tiny_run
    ck = run / "checkpoints" / "best.pt"
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    for tb in (not_a_folder, not_a_folder / "tb"):
        message = _refused([cmd, ck, "--data-root", root, "--index" if cmd != "reconstruct"
                            else "--n", "1", "--tb", tb], tmp_path / "x.png")
        assert "--tb" in message and "not a folder" in message
    # the PNG target too: a folder, or a path under a file, is refused before any work
    _refused([cmd, ck, "--data-root", root, "--no-tb"], not_a_folder / "x.png")
    r = cli(cmd, ck, "--data-root", root, "--no-tb", "--out", tmp_path)
    assert r.exit_code == 2 and "is a folder" in r.output, r.output
    assert not any(tmp_path.glob("*.png"))


def test_the_picture_size_is_bounded_before_drawing(tiny_run, tmp_path, monkeypatch):
    run, root = tiny_run
    ck = run / "checkpoints" / "best.pt"
    monkeypatch.setattr(draw, "MAX_PIXELS", 200_000)
    with pytest.raises(CapsctlError, match="megapixels"):
        commands.run_reconstruct(ck, n=16, scale=4, out=tmp_path / "r.png", no_tb=True,
                                 device="cpu", data_root=str(root))
    with pytest.raises(CapsctlError, match="megapixels"):
        commands.run_perturb(ck, range_=2.5, step=0.05, out=tmp_path / "p.png", no_tb=True,
                             device="cpu", data_root=str(root))
    assert not any(tmp_path.iterdir())


class FakeSource:
    """A dataset's ``get`` contract over fixed images."""

    def __init__(self, x):
        self.x = x

    def get(self, idx):
        return {"x": self.x[idx]}


def test_matrix_capsules_use_the_same_contract():
    """An EM-routed model: routes reads routing_layout + out["routing"]; perturb decodes poses."""
    model, cfg = _model(name="em-capsnet", conv1_channels=8, primary_types=4, caps1_types=3,
                        caps2_types=3)
    x = torch.rand(2, 1, 28, 28)
    maps = routing_maps(model, x)
    T, H, W = model.routing_layout
    c = maps["coupling"]
    assert c.shape[2:] == (T * H * W, cfg.model.num_classes) and "agreement" not in maps
    torch.testing.assert_close(c.sum(-1), torch.ones(c.shape[:3]), atol=1e-5, rtol=0)
    stats = routing_statistics(model, FakeSource(x), 2, torch.device("cpu"), batch=1)
    assert stats["children"] == T * H * W and len(stats["entropy"]) == c.shape[1]
    assert stats["entropy"][-1] == pytest.approx(
        (-(c * c.clamp_min(1e-30).log()).sum(-1).mean(-1) / np.log(10)).mean(0)[-1].item(),
        abs=1e-5)
    recon, pred, _ = reconstruct_batch(model, x, torch.tensor([0, 1]))
    with torch.no_grad():
        pose = model(x)["pose"]
    grid = perturbations(model, pose[0], int(pred[0]), offsets_for(0.1, 0.05))
    torch.testing.assert_close(grid[:, 2], recon[0].flatten().expand(16, -1), atol=1e-6, rtol=0)


def test_a_pair_task_checkpoint_gets_the_segmentation_picture(tiny_run, tmp_path):
    """MultiMNIST (task "pair"): reconstruct draws Figure 5 (three pictures per example)."""
    _, root = tiny_run
    torch.manual_seed(0)
    cfg = tiny_config(model={"input_size": 36, "transform_init_std": 0.3},
                      data={"name": "multimnist", "val_per_digit": 2, "test_limit": 96})
    ck = _save(tmp_path / "multi.pt", build_model(cfg.model).eval(), cfg)
    r = commands.run_reconstruct(ck, n=10, out=tmp_path / "seg.png", no_tb=True, device="cpu",
                                 data_root=str(root))
    assert r["mask"] == "top-2 and labels" and r["examples"] == 10
    mode, (w, h) = _png(tmp_path / "seg.png")
    assert mode == "RGB" and (h, w) == r["size"] and w == 8 * 3 * 36 + 9 * 4
    # the second picture of example 0: red = the longest capsule's digit, green = the second's
    from capsctl.data.build import build_eval

    source = build_eval("multimnist", "test", cfg, torch.device("cpu"), str(root))
    assert source.task == "pair"
    model = build_model(cfg.model).eval()
    model.load_state_dict(checkpoint.load(ck)["model"])
    batch = source.get(torch.arange(8))
    picture = segmentation_grid(model, batch["x"], tasks.get(source.task).model_labels(batch),
                                torch.device("cpu"))
    with torch.no_grad():
        x0 = source.get(torch.arange(1))["x"]
        top = model(x0)["scores"].topk(2, 1).indices
        recon = model(x0, top)["recon"].view(2, 36, 36)
    top_left = GAP + 3 * 36 + GAP
    tile_3SS = picture[:, top_left:top_left + 3 * 36:3, GAP:GAP + 3 * 36:3]
    torch.testing.assert_close(tile_3SS[:2], recon.clamp(0, 1), atol=1 / 255, rtol=0)
    assert tile_3SS[2].abs().max() == 0


def test_routes_summary_is_the_mean_of_the_per_example_couplings(tiny_run, tmp_path):
    """``routes --summary N``: per pass, the statistics of c_ij over the first N examples, equal
    to a per-example loop over what ``routing_maps`` returns; uniform routing is exactly flat."""
    from capsctl.data.build import build_eval

    run, root = tiny_run
    ck = run / "checkpoints" / "best.pt"
    r = cli("routes", ck, "--data-root", root, "--summary", "20", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert (got["examples"], got["children"], got["parents"], got["routing"]) == (20, 72, 10,
                                                                                   "dynamic")
    model, cfg, _ = checkpoint.load_model(ck, torch.device("cpu"))
    source = build_eval("mnist", "test", cfg, torch.device("cpu"), str(root))
    maps = routing_maps(model.eval(), source.get(torch.arange(20))["x"])
    c, pred = maps["coupling"].double(), maps["scores"].argmax(1)
    for k in range(3):
        to_pred = [c[b, k, :, pred[b]].mean().item() for b in range(20)]
        largest = [c[b, k, :, pred[b]].max().item() for b in range(20)]
        ent = [sum(-(p * p.log()).sum().item() for p in c[b, k]) / 72 / np.log(10)
               for b in range(20)]
        decided = [sum(float(p.max() > 0.5) for p in c[b, k]) / 72 for b in range(20)]
        assert got["to_predicted"][k] == pytest.approx(np.mean(to_pred), abs=1e-6)
        assert got["largest_to_predicted"][k] == pytest.approx(np.mean(largest), abs=1e-6)
        assert got["entropy"][k] == pytest.approx(np.mean(ent), abs=1e-6)
        assert got["decided"][k] == pytest.approx(np.mean(decided), abs=1e-6)
    assert got["to_predicted"][0] == pytest.approx(0.1) and got["entropy"][0] == pytest.approx(1)
    assert got["to_predicted"][2] > got["to_predicted"][0]   # agreement moved it (a little)

    flat = _save(tmp_path / "uniform.pt", *_model(routing="uniform"))
    r = cli("routes", flat, "--data-root", root, "--summary", "8")
    assert r.exit_code == 0, r.output
    assert "uniform routing" in r.stdout and "first 8 examples" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert [cell.strip() for cell in row.split("│")[2:6]] == ["0.1000", "0.100", "1.0000",
                                                              "0.00%"]
    for args in (["--summary", "0"], ["--summary", "10001"], ["--summary", "5", "--index", "3"],
                 ["--summary", "5", "--out", tmp_path / "s.png"]):
        r = cli("routes", ck, "--data-root", root, *args)
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, (args, r.output)
    assert not (tmp_path / "s.png").exists()
