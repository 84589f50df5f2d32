"""The confusion matrix of a one-label task: its counts on the device, each class's accuracy,
its picture (PNG for `capsctl eval --confusion`, TensorBoard for the trainer's final test).

Shape legend: B batch, J classes (rows: the true class, columns: the predicted one).
The picture's modules (PIL, inspection/draw.py) are imported when one is drawn.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capsctl.errors import CapsctlError


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


# --- the confusion matrix as a picture ------------------------------------------------------------

RIGHT_COLOUR, WRONG_COLOUR = (70, 200, 110), (255, 70, 70)


def _cell_colour(share: float, right: bool) -> tuple[int, int, int]:
    """The page colour blended towards green (the diagonal) or red (mistakes) by ``share`` of
    the row; mistakes by its square root, so that rare ones still show."""
    from capsctl.inspection.draw import PAGE

    t = share if right else share ** 0.5
    end = RIGHT_COLOUR if right else WRONG_COLOUR
    return tuple(round(p + (e - p) * t) for p, e in zip(PAGE, end))


def _vertical_label(words: str, size: int, height: int):
    """``words`` drawn bottom to top on an image ``height`` px tall (a column header)."""
    from PIL import Image, ImageDraw

    from capsctl.inspection.draw import DIM_TEXT, PAGE, text

    strip = Image.new("RGB", (height, size + 4), PAGE)
    text(ImageDraw.Draw(strip), (height - 4, (size + 4) // 2), words, size, DIM_TEXT, "rm")
    return strip.rotate(90, expand=True)


def confusion_figure(confusion_JJ: list[list[int]], names: list[str],
                     title: list[str]) -> torch.Tensor:
    """The confusion matrix as a picture, (3, H, W) float in [0, 1] (see confusion_image)."""
    from capsctl.inspection.draw import to_tensor

    return to_tensor(confusion_image(confusion_JJ, names, title))


def confusion_image(confusion_JJ: list[list[int]], names: list[str], title: list[str]):
    """The confusion matrix as a PIL image under ``title``: a row per true class, a column per
    predicted class (both labelled with the class names), each cell coloured by its share of
    the row (green: the diagonal, red: mistakes), counts written when the cells are large
    enough, each row's accuracy at its right."""
    from PIL import ImageDraw

    from capsctl.classes import short
    from capsctl.inspection.draw import DIM_TEXT, LINE, TEXT, canvas, font, text, titled

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
    from capsctl.inspection.draw import save_png, stack, to_tensor

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
