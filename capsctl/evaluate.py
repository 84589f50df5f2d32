"""evaluate(model, source) -> metrics: counts on the device, one host sync at the end; the
evaluation of checkpoints (one by one, or an ensemble averaging their scores) that
`capsctl eval` prints; the confusion matrix and its picture.

Shape legend: B batch, J classes (rows of a confusion matrix: the true class, columns: the
predicted one), M ensemble members.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capsctl.data.registry import PAIR
from capsctl.device import autocast
from capsctl.distributed import SINGLE, Group, all_sum
from capsctl.errors import CapsctlError


PAIR_METRICS = ("at_least_one_accuracy", "bbox_overlap_of_smaller", "bbox_overlap_iou")


def model_labels(batch: dict, task: str) -> torch.Tensor:
    """The labels to hand the model: (B,) ``y``, or (B, 2) ``[y, y2]`` for two-label batches
    (each digit then gets its own reconstruction)."""
    return torch.stack([batch["y"], batch["y2"]], 1) if task == PAIR else batch["y"]


def pair_hits(scores_BJ: torch.Tensor, y_B: torch.Tensor, y2_B: torch.Tensor):
    """MultiMNIST scoring, (B,) bools each: ``exact`` when the two highest scores (longest
    capsules) are exactly the two labels (the paper's metric), ``at_least_one`` when one of them
    is a label."""
    top2_B2 = scores_BJ.topk(2, dim=1).indices
    hit_B2 = (top2_B2 == y_B[:, None]) | (top2_B2 == y2_B[:, None])
    return hit_B2.all(1), hit_B2.any(1)


def count_correct(scores_BJ: torch.Tensor, batch: dict, task: str) -> torch.Tensor:
    """Correct examples in a batch (a device scalar): top-1 = y, or the exact pair (y, y2)."""
    if task == PAIR:
        return pair_hits(scores_BJ, batch["y"], batch["y2"])[0].sum()
    return (scores_BJ.argmax(dim=1) == batch["y"]).sum()


def confusion_counts(scores_BJ: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
    """(J, J) int64 counts on the device: row = true class, column = predicted class (top-1);
    one bincount of ``y * J + prediction``."""
    J = scores_BJ.shape[1]
    pred_B = scores_BJ.argmax(dim=1)
    return torch.bincount(y_B * J + pred_B, minlength=J * J)[:J * J].view(J, J)


def per_class_accuracy(confusion_JJ: list[list[int]]) -> list[float | None]:
    """Each class's accuracy (its diagonal count over its row's total); None for a class with
    no examples."""
    return [row[j] / sum(row) if sum(row) else None for j, row in enumerate(confusion_JJ)]


def _batches(source, batch_size: int, limit: int | None, group: Group, device: torch.device):
    """The source's batches; under torchrun each rank takes every world-th batch."""
    if not group.enabled:
        yield from source.batches(batch_size, limit)
        return
    n = len(source) if limit is None else min(limit, len(source))
    for start in range(group.rank * batch_size, n, group.world * batch_size):
        yield source.get(torch.arange(start, min(start + batch_size, n), device=device))


@torch.no_grad()
def evaluate(model, source, batch_size: int, device: torch.device, precision: str = "fp32",
             loss_fn=None, limit: int | None = None, progress=None, step: int = 0,
             group: Group = SINGLE, confusion: bool = False) -> dict:
    """Accuracy (and mean loss terms when ``loss_fn`` is given) of ``model`` on ``source``.

    ``progress`` is an optional callable(n_done) for a progress bar. Under torchrun the batches
    are sharded across ranks and the counts summed, so every rank gets the one-process numbers.
    ``confusion`` (one-label tasks): also "confusion", the (J, J) list of counts (rows: true
    class, columns: prediction), and "per_class_accuracy", a list of J (None: no examples).
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    sums: dict[str, torch.Tensor] = {}
    pair_sums: dict[str, torch.Tensor] = {}
    conf_JJ = None
    n = 0
    two = source.task == PAIR  # MultiMNIST: score by exact pair; the loss decodes each digit
    for batch in _batches(source, batch_size, limit, group, device):
        with autocast(device, precision):
            out = model(batch["x"], model_labels(batch, source.task) if two and loss_fn else None)
        correct += count_correct(out["scores"], batch, source.task)
        if two:
            _add_pair_sums(pair_sums, out["scores"], batch)
        elif confusion:
            counts = confusion_counts(out["scores"], batch["y"])
            conf_JJ = counts if conf_JJ is None else conf_JJ + counts
        b = batch["y"].shape[0]
        if loss_fn is not None:
            for k, v in loss_fn(out, batch, step).items():
                sums[k] = sums.get(k, 0) + v.detach().float() * b
        n += b
        if progress is not None:
            progress(n)
    model.train(was_training)
    return _read_metrics(correct, n, sums, pair_sums, conf_JJ, group, device)


def _read_metrics(correct, n: int, sums: dict, pair_sums: dict, conf_JJ, group: Group,
                  device) -> dict:
    """The device counts and sums as plain numbers: packed into one float64 tensor, summed over
    ranks under torchrun (counts, not averages of averages), read in one host sync."""
    names = sorted(sums) + sorted(pair_sums)
    both = {**sums, **pair_sums}
    parts = [correct.double().view(1), torch.tensor([float(n)], dtype=torch.float64,
                                                     device=device)]
    parts += [both[k].double().view(1) for k in names]
    if conf_JJ is not None:
        parts.append(conf_JJ.double().flatten())
    values = all_sum(torch.cat(parts), group).tolist()   # the one host sync
    c, n = int(values[0]), int(values[1])
    metrics = {"n": n, "correct": c, "accuracy": c / max(n, 1), "error": 1 - c / max(n, 1)}
    value_of = dict(zip(names, values[2:]))
    for k in sums:       # in the loss's order, then the pair extras'
        metrics[f"loss_{k}"] = value_of[k] / max(n, 1)
    for k in pair_sums:
        metrics[k] = value_of[k] / max(n, 1)
    if conf_JJ is not None:
        J = conf_JJ.shape[0]
        flat = [int(v) for v in values[2 + len(names):]]
        metrics["confusion"] = [flat[i * J:(i + 1) * J] for i in range(J)]
        metrics["per_class_accuracy"] = per_class_accuracy(metrics["confusion"])
    return metrics


def _add_pair_sums(sums: dict, scores_BJ: torch.Tensor, batch: dict) -> None:
    """Two-digit extras (summed on the device): at-least-one-correct and the bounding-box
    overlap of the pairs seen."""
    from capsctl.data.multimnist import bbox_overlap

    one_B = pair_hits(scores_BJ, batch["y"], batch["y2"])[1]
    extras = {"at_least_one_accuracy": one_B.sum()}
    for k, v in bbox_overlap(batch["x_a"], batch["x_b"]).items():
        extras[f"bbox_overlap_{k}"] = v.sum()
    for k, v in extras.items():
        sums[k] = sums.get(k, 0) + v.float()


# --- ensembles ----------------------------------------------------------------------------------

class Ensemble(torch.nn.Module):
    """Several trained models as one: ``forward(x)["scores"]`` is the mean of the members'
    scores (class-capsule lengths; the paper's 7-model MNIST ensemble), in fp32."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
        scores_MBJ = torch.stack([m(x)["scores"].float() for m in self.members])
        return {"scores": scores_MBJ.mean(0)}


# What ``scores`` means for each family (models/contract.py): an ensemble averages one kind.
SCORE_KINDS = {"capsnet": "capsule lengths", "efficient-capsnet": "capsule lengths",
               "em-capsnet": "capsule activations", "cnn": "logits",
               "multimnist-cnn": "sigmoid probabilities"}


def score_kind(model_name: str) -> str:
    """What the scores of family ``model_name`` are (a family not listed: its own kind)."""
    return SCORE_KINDS.get(model_name, f"{model_name} scores")


def check_ensemble(paths, cfgs, names: list[list[str]]) -> None:
    """Raise a one-line CapsctlError unless every member was trained on the same dataset, with
    the same classes, takes the same input and produces the same kind of score (averaging
    capsule lengths in [0, 1] with a CNN's raw logits would let the CNN decide alone)."""
    first = cfgs[0]
    for path, cfg, cls in zip(paths[1:], cfgs[1:], names[1:]):
        what = None
        if cfg.data.name != first.data.name:
            what = f"dataset {cfg.data.name} (the first: {first.data.name})"
        elif cls != names[0]:
            what = "other classes than the first"
        elif score_kind(cfg.model.name) != score_kind(first.model.name):
            raise CapsctlError(
                f"--ensemble: {path} is a {cfg.model.name} whose scores are "
                f"{score_kind(cfg.model.name)}, the first ({paths[0]}) a {first.model.name} "
                f"whose scores are {score_kind(first.model.name)}; an ensemble averages one "
                "kind of score: ensemble the two kinds separately")
        elif (cfg.model.input_size, cfg.model.in_channels) != (first.model.input_size,
                                                                first.model.in_channels):
            what = (f"{cfg.model.in_channels}x{cfg.model.input_size}x{cfg.model.input_size} "
                    f"inputs (the first: {first.model.in_channels}x{first.model.input_size}x"
                    f"{first.model.input_size})")
        if what:
            raise CapsctlError(f"--ensemble: {path} has {what}; an ensemble's checkpoints must "
                               "share the dataset, the classes and the input")


# --- checkpoints ---------------------------------------------------------------------------------

def _result(label: str, name: str, split: str, m: dict, model_name: str, step, names) -> dict:
    """One row of `capsctl eval`'s results."""
    r = {"checkpoint": label, "dataset": name, "split": split, "n": m["n"],
         "correct": m["correct"], "accuracy": m["accuracy"], "error": m["error"],
         "model": model_name, "step": step, **{k: m[k] for k in PAIR_METRICS if k in m}}
    if "confusion" in m:
        r["classes"] = list(names)
        r["per_class_accuracy"] = dict(zip(names, m["per_class_accuracy"]))
        r["confusion"] = m["confusion"]
    return r


class RelabeledSource:
    """An evaluation source whose labels are renumbered into a model's classes (``map_K``:
    the model's index of each of the source's classes): a folder holding the model's classes
    in another order, or a subset of them, is scored by name."""

    def __init__(self, source, map_K: list[int], device):
        self.source = source
        self.map_K = torch.tensor(map_K, dtype=torch.long, device=device)
        self.task, self.name = source.task, getattr(source, "name", None)
        self.default_limit = source.default_limit

    def __len__(self) -> int:
        return len(self.source)

    def _relabel(self, batch: dict) -> dict:
        out = dict(batch)
        for key in ("y", "y2"):
            if key in out:
                out[key] = self.map_K[out[key]]
        return out

    def batches(self, batch_size: int, limit: int | None = None):
        for batch in self.source.batches(batch_size, limit):
            yield self._relabel(batch)

    def get(self, idx: torch.Tensor) -> dict:
        return self._relabel(self.source.get(idx))


def eval_source(name: str, split: str, cfg, device, data_root, model_names: list[str] | None):
    """The evaluation source of dataset ``name`` for a model of ``cfg`` whose classes are
    ``model_names`` (None: not stored in its checkpoint, labels taken as they are). Where the
    dataset's classes come from its files (a ``folder`` dataset) they are matched to the
    model's by name: the same names in any order, or a subset of them, are scored as the
    model's classes; other names are one line (classes.label_map)."""
    import dataclasses

    from capsctl.classes import dataset_class_names, label_map
    from capsctl.data.build import _options as data_options, build_eval
    from capsctl.data.registry import DATASETS

    spec = DATASETS.get(name)
    if model_names is None or spec is None or spec.classes_of is None:
        return build_eval(name, split, cfg, device, data_root)
    data_cfg = dataclasses.replace(cfg, data=data_options(name, cfg))
    data_names = dataset_class_names(data_cfg, data_root)
    if data_names is None:   # no folder to read yet: the builder says what is missing
        return build_eval(name, split, cfg, device, data_root)
    map_K = label_map(model_names, data_names, f"dataset {name}")
    if map_K is None:
        return build_eval(name, split, cfg, device, data_root)
    subset_cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, num_classes=len(data_names)))   # the folder's own count, for its builder
    return RelabeledSource(build_eval(name, split, subset_cfg, device, data_root), map_K,
                           device)


def _evaluate_on(model, cfg, label: str, model_names: list[str] | None, datasets, split: str,
                 device, batch_size, limit, data_root, progress_console, group: Group):
    """(dataset name, metrics) of ``model`` on each dataset (default: the one it trained on);
    ``model_names``: its stored class names, which a folder's classes are matched to."""
    from rich.markup import escape
    from rich.progress import Progress

    for name in datasets or [cfg.data.name]:
        source = eval_source(name, split, cfg, device, data_root, model_names)
        # a streamed source (MultiMNIST: 10M) evaluates a default prefix unless told
        n_max = limit if limit is not None else source.default_limit
        total = len(source) if n_max is None else min(n_max, len(source))
        bs = batch_size or cfg.train.eval_batch_size
        with Progress(console=progress_console, disable=progress_console is None,
                      transient=True) as bar:
            task = bar.add_task(escape(f"{label} on {name}"), total=total)
            m = evaluate(model, source, bs, device, cfg.train.precision, limit=n_max,
                         progress=lambda n: bar.update(task, completed=n), group=group,
                         confusion=True)
        yield name, m


def evaluate_checkpoints(paths, datasets, split: str, device_name: str | None,
                         batch_size: int | None, limit: int | None, data_root: str | None,
                         progress_console=None, group: Group = SINGLE,
                         ensemble: bool = False) -> list[dict]:
    """Evaluate every checkpoint on every dataset (default: the one it was trained on); with
    ``ensemble`` the checkpoints' scores are averaged into one model (one row per dataset,
    checkpoint "ensemble of N"). Each row has per-class accuracy ({class name: accuracy}) and
    the confusion matrix for one-label datasets."""
    from capsctl.checkpoint import load_model
    from capsctl.classes import class_names_of
    from capsctl.device import resolve

    device = resolve(device_name or "auto")
    args = (datasets, split, device, batch_size, limit, data_root, progress_console, group)
    results = []
    if ensemble:
        loaded = [load_model(p, device) for p in paths]
        names = [class_names_of(cfg, state, data_root) for _, cfg, state in loaded]
        check_ensemble(paths, [cfg for _, cfg, _ in loaded], names)
        model, cfg = Ensemble([m for m, _, _ in loaded]).eval(), loaded[0][1]
        label = f"ensemble of {len(paths)}"
        model_name = "+".join(dict.fromkeys(c.model.name for _, c, _ in loaded))
        stored = names[0] if all("class_names" in st for _, _, st in loaded) else None
        for name, m in _evaluate_on(model, cfg, label, stored, *args):
            results.append({**_result(label, name, split, m, model_name, None, names[0]),
                            "checkpoints": [str(p) for p in paths]})
        return results
    for path in paths:
        model, cfg, state = load_model(path, device)
        names = class_names_of(cfg, state, data_root)
        stored = names if "class_names" in state else None
        for name, m in _evaluate_on(model, cfg, Path(str(path)).name, stored, *args):
            results.append(_result(str(path), name, split, m, cfg.model.name,
                                   state.get("step"), names))
    return results


# --- the confusion matrix as a picture ------------------------------------------------------------

RIGHT_COLOUR, WRONG_COLOUR = (70, 200, 110), (255, 70, 70)


def _cell_colour(share: float, right: bool) -> tuple[int, int, int]:
    """The page colour blended towards green (the diagonal) or red (mistakes) by ``share`` of
    the row; mistakes by its square root, so that rare ones still show."""
    from capsctl.inspect.draw import PAGE

    t = share if right else share ** 0.5
    end = RIGHT_COLOUR if right else WRONG_COLOUR
    return tuple(round(p + (e - p) * t) for p, e in zip(PAGE, end))


def _vertical_label(words: str, size: int, height: int):
    """``words`` drawn bottom to top on an image ``height`` px tall (a column header)."""
    from PIL import Image, ImageDraw

    from capsctl.inspect.draw import DIM_TEXT, PAGE, text

    strip = Image.new("RGB", (height, size + 4), PAGE)
    text(ImageDraw.Draw(strip), (height - 4, (size + 4) // 2), words, size, DIM_TEXT, "rm")
    return strip.rotate(90, expand=True)


def confusion_figure(confusion_JJ: list[list[int]], names: list[str],
                     title: list[str]) -> torch.Tensor:
    """The confusion matrix as a picture, (3, H, W) float in [0, 1] (see confusion_image)."""
    from capsctl.inspect.draw import to_tensor

    return to_tensor(confusion_image(confusion_JJ, names, title))


def confusion_image(confusion_JJ: list[list[int]], names: list[str], title: list[str]):
    """The confusion matrix as a PIL image under ``title``: a row per true class, a column per
    predicted class (both labelled with the class names), each cell coloured by its share of
    the row (green: the diagonal, red: mistakes), counts written when the cells are large
    enough, each row's accuracy at its right."""
    from PIL import ImageDraw

    from capsctl.classes import short
    from capsctl.inspect.draw import DIM_TEXT, LINE, TEXT, canvas, font, text, titled

    J = len(names)
    cell = max(8, min(36, round(480 / J)))
    size = 12 if cell >= 14 else 9
    labels = [short(n, 18) for n in names]
    left = max(int(font(size).getlength(t)) for t in labels) + 12
    head = left                                   # the column headers: the same names
    right = int(font(size).getlength("100.0%")) + 12
    page = canvas(left + J * cell + 1 + right, head + J * cell + 1)
    draw = ImageDraw.Draw(page)
    draw.rectangle((left, head, left + J * cell, head + J * cell), fill=LINE)
    for i, row in enumerate(confusion_JJ):
        total = sum(row)
        y0 = head + i * cell
        text(draw, (left - 6, y0 + cell // 2), labels[i], size, TEXT, "rm")
        acc = f"{row[i] / total:.1%}" if total else "-"
        text(draw, (left + J * cell + 8, y0 + cell // 2), acc, size, DIM_TEXT, "lm")
        for j, count in enumerate(row):
            x0 = left + j * cell
            draw.rectangle((x0 + 1, y0 + 1, x0 + cell - 1, y0 + cell - 1),
                           fill=_cell_colour(count / total if total else 0.0, i == j))
            if count and cell >= 24 and len(str(count)) * 6 < cell:
                text(draw, (x0 + cell // 2, y0 + cell // 2), str(count), 10, TEXT, "mm")
    for j, words in enumerate(labels):
        page.paste(_vertical_label(words, size, head), (left + j * cell + (cell - size - 4) // 2,
                                                        0))
    return titled(page, title)


def _png_target(path: Path) -> None:
    """Raise unless a PNG can be written at ``path`` (its folder exists or can be made)."""
    from capsctl.paths import nearest_existing, writable_folder

    if path.is_dir():
        raise CapsctlError(f"--confusion {path} is a folder; give a file name such as "
                           f"{path / 'confusion.png'}")
    folder = nearest_existing(path.parent)
    if not writable_folder(folder):
        raise CapsctlError(f"--confusion {path}: cannot write into {folder}")


def check_confusion_target(path: str | Path | None) -> None:
    """Raise a one-line CapsctlError unless ``--confusion PATH`` can be written (called before
    anything is evaluated); None: nothing to check."""
    if path is not None:
        _png_target(Path(path))


def confusion_png(results: list[dict], path: str | Path) -> Path:
    """Write the confusion matrices of ``results`` (those of one-label datasets) side by side
    into one PNG; returns its path."""
    from capsctl.inspect.draw import save_png, stack, to_tensor

    panels = [confusion_image(
        r["confusion"], r["classes"],
        [f"{r['checkpoint']} - {r['dataset']} {r['split']}: accuracy {r['accuracy']:.2%} "
         f"(n={r['n']:,})", "rows: true class; columns: predicted; colour: share of the row"])
        for r in results if "confusion" in r]
    if not panels:
        raise CapsctlError("--confusion: no confusion matrix to draw (two-label datasets such "
                           "as multimnist have none)")
    return save_png(to_tensor(stack(panels, columns=2)), path)


def log_confusion(writers, metrics: dict, names: list[str], step: int,
                  prefix: str = "test") -> None:
    """TensorBoard (and metrics.jsonl) at the final test: the confusion picture as image
    ``{prefix}/confusion`` and each class's accuracy as ``{prefix}/class_accuracy/<name>``.
    ``metrics``: evaluate(..., confusion=True)'s; nothing is logged without a confusion
    matrix (two-label tasks)."""
    if "confusion" not in metrics:
        return
    title = [f"{prefix}: accuracy {metrics['accuracy']:.2%} (n={metrics['n']:,}) at step "
             f"{step:,}", "rows: true class; columns: predicted; colour: share of the row"]
    writers.image(f"{prefix}/confusion", confusion_figure(metrics["confusion"], names, title),
                  step)
    writers.log({f"{prefix}/class_accuracy/{name}": acc
                 for name, acc in zip(names, metrics["per_class_accuracy"])
                 if acc is not None}, step)
