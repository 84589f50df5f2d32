"""What `capsctl reconstruct`, `perturb` and `routes` run: checkpoint in, PNG (and TensorBoard
image) out, a summary dict back.

Every option is checked, and so are the PNG and TensorBoard targets, before anything is
written: bad input is a one-line CapsctlError and leaves no file behind.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from capsctl import tasks
from capsctl.compare import routing_of
from capsctl.paths import nearest_existing
from capsctl.runfolder import RunFolder
from capsctl.errors import CapsctlError
from capsctl.inspection import draw, figures, probe

SPLITS = ("test", "val")
MASKS = ("predicted", "label")


# --- checks before anything is loaded or written ------------------------------------------------

def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint: RUN for RUN/checkpoints/X.pt or a folder argument."""
    return RunFolder.of_checkpoint(checkpoint).root


def _writable_folder(folder: Path, what: str) -> None:
    """Raise unless ``folder`` is, or can be created as, a folder this process may write into."""
    probe_at = nearest_existing(folder)
    if not probe_at.is_dir():
        raise CapsctlError(f"{what}: {probe_at} is not a folder")
    if not os.access(probe_at, os.W_OK | os.X_OK):
        raise CapsctlError(f"{what}: cannot write into {probe_at} (permission denied)")


def targets(out, default_name: str, checkpoint, tb, no_tb: bool) -> tuple[Path, Path | None]:
    """(PNG path, TensorBoard folder or None), both checked writable; nothing is created."""
    png = Path(out) if out else run_folder(checkpoint) / default_name
    if png.is_dir():
        raise CapsctlError(f"--out {png} is a folder; give a file name such as "
                           f"{png / default_name}")
    _writable_folder(png.parent, f"--out {png}")
    if no_tb:
        return png, None
    tb_dir = Path(tb) if tb else RunFolder.of_checkpoint(checkpoint).tb
    _writable_folder(tb_dir, f"--tb {tb_dir} (or --no-tb)")
    return png, tb_dir


def _check_options(n: int = 1, scale: int | None = 1, mask: str = "predicted",
                   split: str = "test") -> None:
    if mask not in MASKS:
        raise CapsctlError(f"--mask {mask!r}: expected predicted or label")
    if split not in SPLITS:
        raise CapsctlError(f"--split {split!r}: expected test or val")
    if n < 1:
        raise CapsctlError(f"--n {n}: expected at least 1")
    if scale is not None:
        draw.check_scale(scale)


def _one_way(index, digit) -> None:
    if index is not None and digit is not None:
        raise CapsctlError("--index and --digit conflict: choose the example one way")
    if index is not None and index < 0:
        raise CapsctlError(f"--index {index}: expected 0 or more")


def parse_digit(digit: str | None, num_classes: int,
                names: list[str] | None = None) -> list[int] | None:
    """The classes ``--digit`` names: [K] for a class number or (case aside) a class name of
    ``names``, every class for 'all', None when not given."""
    if digit is None:
        return None
    if digit.strip().lower() == "all":
        return list(range(num_classes))
    by_name = [k for k, n in enumerate(names or []) if n.lower() == digit.strip().lower()]
    if by_name:
        return by_name[:1]
    try:
        k = int(digit)
    except ValueError:
        raise CapsctlError(f"--digit {digit!r}: expected a class 0..{num_classes - 1}"
                           + (", a class name" if names else "") + " or 'all'") from None
    if not 0 <= k < num_classes:
        raise CapsctlError(f"--digit {k}: expected a class 0..{num_classes - 1} or 'all'")
    return [k]


# --- model and data ----------------------------------------------------------------------------

def _load(checkpoint, device_name: str | None):
    """(model in eval mode, config, checkpoint state, device)."""
    from capsctl.checkpoint import load_model
    from capsctl.device import resolve

    device = resolve(device_name or "auto")
    model, cfg, state = load_model(checkpoint, device)
    return model.eval(), cfg, state, device


def _names(cfg, state, data_root) -> list[str]:
    """The model's class names (capsctl.classes.class_names_of)."""
    from capsctl.classes import class_names_of

    return class_names_of(cfg, state, str(data_root) if data_root else None)


def _source(cfg, dataset: str | None, split: str, device, data_root):
    """The evaluation source of ``dataset`` (default: the checkpoint's), its first example
    checked against the model's input (_check_input)."""
    from capsctl.data.build import build_eval

    name = dataset or cfg.data.name
    source = build_eval(name, split, cfg, device, str(data_root) if data_root else None)
    _check_input(cfg.model, _get(source, [0], device)["x"], name)
    return source


def _check_indices(indices: list[int], n: int) -> None:
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise CapsctlError(f"index {bad[0]} is out of range: the split has {n} examples "
                           f"(0..{n - 1})")


def _get(source, indices: list[int], device) -> dict:
    _check_indices(indices, len(source))
    return source.get(torch.tensor(indices, dtype=torch.long, device=device))


def _check_input(model_cfg, x: torch.Tensor, dataset: str) -> None:
    side = x.shape[-1]
    if side != model_cfg.input_size:
        raise CapsctlError(f"dataset '{dataset}' has {side}x{side} images but this model takes "
                           f"{model_cfg.input_size}x{model_cfg.input_size}; pick a --dataset of "
                           "that size")


# --- output -------------------------------------------------------------------------------------

def _write(image: torch.Tensor, png: Path, tb_dir: Path | None, tag: str, step: int) -> dict:
    """Save the PNG and, unless ``tb_dir`` is None, the TensorBoard image. Returns
    {"png": path, "tensorboard": folder or None}."""
    draw.save_png(image, png)
    written = {"png": str(png), "tensorboard": None}
    if tb_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        try:
            w = SummaryWriter(str(tb_dir))
            w.add_image(tag, image, step)
            w.close()
        except OSError as e:
            raise CapsctlError(f"cannot write the TensorBoard image into {tb_dir}: "
                               f"{e.strerror or e} (use --tb DIR or --no-tb)") from None
        written["tensorboard"] = str(tb_dir)
    return written


def _describe(checkpoint, state) -> str:
    step = state.get("step")
    return f"{Path(checkpoint)}" + (f" (step {step:,})" if isinstance(step, int) else "")


def _round(t: torch.Tensor, digits: int = 5):
    """A tensor as nested lists of floats rounded for JSON (NaN/inf become None)."""
    def walk(x):
        if isinstance(x, list):
            return [walk(e) for e in x]
        return round(x, digits) if math.isfinite(x) else None

    return walk(t.double().tolist())


# --- reconstruct --------------------------------------------------------------------------------

def _choose(source, names: list[str], n: int, indices, by_class: bool, g, dev):
    """(chosen indices, rows of batch positions, row titles (class names) or None)."""
    if indices:
        chosen = list(indices)
    elif by_class:
        y_all = source.get(torch.arange(len(source), device=dev))["y"].cpu()
        rows, titles, chosen = [], [], []
        for k in range(len(names)):
            members = torch.nonzero(y_all == k).flatten()
            pick = members[torch.randperm(len(members), generator=g)[:n]].sort().values.tolist()
            if pick:
                rows.append(list(range(len(chosen), len(chosen) + len(pick))))
                titles.append(names[k])
                chosen += pick
        return chosen, rows, titles
    else:
        chosen = torch.randperm(len(source), generator=g)[:n].sort().values.tolist()
    cols = min(16, len(chosen))
    return chosen, [list(range(i, min(i + cols, len(chosen))))
                    for i in range(0, len(chosen), cols)], None


def run_reconstruct(checkpoint, dataset=None, split="test", n=16, indices=None,
                    by_class=True, mask="predicted", seed=0, out=None, tb=None, no_tb=False,
                    device=None, data_root=None, scale=2) -> dict:
    """Inputs above their reconstructions: one row per true class (``n`` each, drawn with
    ``seed``), or a plain grid of ``n`` random examples or of ``indices``. A source whose
    task has more than one label per example (MultiMNIST's pairs) gets its task's picture
    instead (the segmentation picture). Returns the summary dict."""
    _check_options(n, scale, mask, split)
    model, cfg, state, dev = _load(checkpoint, device)
    probe.require_decoder(model, "reconstruct")
    png, tb_dir = targets(out, "reconstruct.png", checkpoint, tb, no_tb)
    name = dataset or cfg.data.name
    source = _source(cfg, dataset, split, dev, data_root)
    g = torch.Generator().manual_seed(seed)
    task = tasks.get(source.task)
    if not task.one_label:
        return _run_task_picture(model, cfg, state, source, task, indices, n, g, dev,
                                 checkpoint, png, tb_dir, split, name)
    names = _names(cfg, state, data_root)
    chosen, rows, titles = _choose(source, names, n, indices, by_class, g, dev)
    batch = _get(source, chosen, dev)
    draw.check_pixels(*figures.reconstruction_size(batch["x"].shape[-1], scale, rows, titles))
    recon, pred, _ = probe.reconstruct_batch(model, batch["x"], batch["y"], mask)
    wrong = int((pred != batch["y"]).sum())
    mse = float(((recon - batch["x"]) ** 2).mean())
    title = [f"capsctl reconstruct - {_describe(checkpoint, state)} - {name} {split}",
             f"top: input, bottom: reconstruction from the {mask} class capsule; "
             + ("rows: the label, caption: the prediction" if titles else
                "y label, p prediction")
             + f"; red: misclassified ({wrong} of {len(chosen)})"]
    image = figures.reconstruction_figure(batch["x"], recon, batch["y"].cpu(), pred.cpu(), rows,
                                          titles, title, scale, names)
    written = _write(image, png, tb_dir, "inspect/reconstruct", state.get("step") or 0)
    return {**written, "examples": len(chosen), "misclassified": wrong, "mse": mse,
            "mask": mask, "dataset": name, "split": split, "size": tuple(image.shape[1:])}


def _run_task_picture(model, cfg, state, source, task, indices, n, g, dev, checkpoint, png,
                      tb_dir, split, name) -> dict:
    """`capsctl reconstruct` of a task with several labels per example: its own picture (a
    pair's: the segmentation picture) of ``n`` random examples or of ``indices``."""
    chosen = list(indices) if indices else torch.randperm(
        min(len(source), 100_000), generator=g)[:n].sort().values.tolist()
    batch = _get(source, chosen, dev)
    was = model.training
    model.eval()
    try:
        image = task.picture(model, batch, dev, cfg.train.precision)
    finally:
        model.train(was)
    written = _write(image, png, tb_dir, f"inspect/{task.picture_tag}", state.get("step") or 0)
    return {**written, "examples": len(chosen), "misclassified": None, "mse": None,
            "mask": task.picture_mask, "dataset": name, "split": split,
            "size": tuple(image.shape[1:])}


# --- perturb ------------------------------------------------------------------------------------

def _perturb_lines(name, split, idx, y, p, cls, use_label, length, score,
                   names: list[str]) -> list[str]:
    verdict = "" if y == p else f"  (misclassified as {names[p]})"
    return [f"{name} {split} #{idx}: label {names[y]}{verdict}",
            f"capsule {names[cls]} ({'label' if use_label else 'predicted'}), {length} = "
            f"{score:.3f}",
            "rows: dimensions d0.., with their mean |pixel change| x 1000"]


@torch.no_grad()
def run_perturb(checkpoint, index=None, digit=None, use_label=False, range_=0.25, step=0.05,
                dataset=None, split="test", out=None, tb=None, no_tb=False, device=None,
                data_root=None, scale=None) -> dict:
    """Figure 4: the chosen example(s) (``index``, or a confident example of ``digit``, or of
    every class by default), one D x K panel each, and the per-dimension change. ``scale``
    None: 3 for one example, 2 for several. Returns the summary dict."""
    offsets = probe.offsets_for(range_, step)
    _one_way(index, digit)
    _check_options(scale=scale, split=split)
    model, cfg, state, dev = _load(checkpoint, device)
    probe.require_decoder(model, "perturb")
    png, tb_dir = targets(out, "perturb.png", checkpoint, tb, no_tb)
    name = dataset or cfg.data.name
    names = _names(cfg, state, data_root)
    source = _source(cfg, dataset, split, dev, data_root)
    if index is not None:
        _check_indices([index], len(source))
        chosen = [index]
    else:
        classes = parse_digit(digit or "all", cfg.model.num_classes, names)
        chosen = list(probe.confident_examples(model, source, classes, dev).values())
    scale = scale or (3 if len(chosen) == 1 else 2)
    batch = _get(source, chosen, dev)
    x = batch["x"]
    out_ = model(x)
    caps_BJD = probe.capsules(model, out_)
    size = figures.perturb_panel_size(caps_BJD.shape[-1], len(offsets), x.shape[-1], scale)
    draw.check_pixels(*draw.stack_size([size] * len(chosen), columns=5))
    scores_BJ = out_["scores"].float()
    pred_B = scores_BJ.argmax(1)
    length = "|v|" if model.capsule_key == "v" else "activation"
    panels, rows = [], []
    for b, idx in enumerate(chosen):
        y, p = int(batch["y"][b]), int(pred_B[b])
        cls = y if use_label else p
        recon_DKN = probe.perturbations(model, caps_BJD[b], cls, offsets)
        change_D = probe.dimension_change(recon_DKN).cpu()
        D, K = recon_DKN.shape[:2]
        lines = _perturb_lines(name, split, idx, y, p, cls, use_label, length,
                               float(scores_BJ[b, cls]), names)
        panels.append(figures.perturb_panel(recon_DKN.view(D, K, *x.shape[1:]).cpu(), offsets,
                                            change_D, x[b].cpu(), lines, scale))
        rows.append({"index": idx, "label": y, "prediction": p, "capsule": cls,
                     "label_name": names[y], "prediction_name": names[p],
                     "length": float(scores_BJ[b, cls]), "change": change_D.tolist()})
    title = [f"capsctl perturb - {_describe(checkpoint, state)}",
             f"each row adds {offsets[0]:+.2f} .. {offsets[-1]:+.2f} (step {step:g}) to one "
             "dimension of the capsule; the framed column is the unperturbed reconstruction; "
             "the 3 dimensions that change it most are highlighted"]
    image = draw.to_tensor(draw.titled(draw.stack(panels, columns=5), title))
    written = _write(image, png, tb_dir, "inspect/perturb", state.get("step") or 0)
    return {**written, "examples": rows, "offsets": offsets.tolist(),
            "size": tuple(image.shape[1:])}


# --- routes -------------------------------------------------------------------------------------

def _routes_result(maps, grid, agree, scores, written, checkpoint, name, split, index, label,
                   image, names: list[str]) -> dict:
    T, H, W = maps["layout"]
    c = maps["coupling"][0].cpu()
    result = {**written, "checkpoint": str(checkpoint), "dataset": name, "split": split,
              "index": index, "label": label, "prediction": int(scores.argmax()),
              "label_name": names[label], "prediction_name": names[int(scores.argmax())],
              "score": maps["score_name"], "layout": {"types": T, "height": H, "width": W},
              "scores": _round(scores), "coupling_share": _round(c.mean(1)),
              "coupling_grid": _round(grid), "coupling": _round(c),
              "size": list(image.shape[1:])}
    if "agreement" in maps:
        a = maps["agreement"][0].cpu()
        result["agreement_total"] = _round(a.sum(0))
        result["agreement_grid"] = _round(agree)
        result["agreement"] = _round(a)
    return result


@torch.no_grad()
def run_routes_summary(checkpoint, n: int, dataset=None, split="test", device=None,
                       data_root=None) -> dict:
    """How far the routing is from uniform over the first ``n`` examples of the split
    (probe.routing_statistics): numbers only, nothing written."""
    _check_options(split=split)
    model, cfg, state, dev = _load(checkpoint, device)
    probe.require_routing(model)
    name = dataset or cfg.data.name
    source = _source(cfg, dataset, split, dev, data_root)
    if not 1 <= n <= len(source):
        raise CapsctlError(f"--summary {n}: the {name} {split} split has {len(source)} examples; "
                           f"give 1 to {len(source)}")
    stats = probe.routing_statistics(model, source, n, dev)
    return {"checkpoint": str(checkpoint), "dataset": name, "split": split,
            "routing": routing_of(dataclasses.asdict(cfg.model)), **stats}


def run_routes(checkpoint, index=None, digit=None, dataset=None, split="test", out=None,
               tb=None, no_tb=False, device=None, data_root=None, scale=3) -> dict:
    """Coupling coefficients after each routing pass and the agreement per class, for one
    example (``index``, default 0, or a confident example of ``digit``). Returns the summary
    dict (``coupling_share``: per pass, the mean of c_ij over the children, per class)."""
    _one_way(index, digit)
    _check_options(scale=scale, split=split)
    model, cfg, state, dev = _load(checkpoint, device)
    T, H, W = probe.require_routing(model)
    png, tb_dir = targets(out, "routes.png", checkpoint, tb, no_tb)
    name = dataset or cfg.data.name
    names = _names(cfg, state, data_root)
    source = _source(cfg, dataset, split, dev, data_root)
    if digit is not None:
        classes = parse_digit(digit, cfg.model.num_classes, names)
        if len(classes) != 1:
            raise CapsctlError("routes shows one example: --digit takes a single class")
        index = probe.confident_examples(model, source, classes, dev)[classes[0]]
    index = 0 if index is None else index
    batch = _get(source, [index], dev)
    maps = probe.routing_maps(model, batch["x"])
    grid = maps["coupling_grid"][0].cpu()
    agree = maps["agreement_grid"][0].cpu() if "agreement_grid" in maps else None
    scores = maps["scores"][0].cpu()
    label = int(batch["y"][0])
    R, J = grid.shape[:2]
    row_name, symbol, what = figures.routing_words(model.routing_label)
    title = [f"capsctl routes - {_describe(checkpoint, state)} - {name} {split} #{index}",
             f"{T * H * W} children ({T} types on a {H}x{W} grid) route to {J} class capsules "
             f"in {R} {what} at each grid position",
             f"(mean of the {T} types) minus the uniform start 1/{J}"
             + ("; agreement: what routing adds to b_ij" if agree is not None else "")]
    image = figures.routes_figure(batch["x"][0].cpu(), grid, agree, scores, label, title, scale,
                                  maps["score_name"], (row_name, symbol), names)
    written = _write(image, png, tb_dir, "inspect/routes", state.get("step") or 0)
    return _routes_result(maps, grid, agree, scores, written, checkpoint, name, split, index,
                          label, image, names)
