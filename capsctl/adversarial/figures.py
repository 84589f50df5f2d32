"""The pictures of ``capsctl attack``: clean and adversarial images with the reconstructions
from the winning class and the predictions (``examples_png``), accuracy against eps with one
line per run and method (``robustness_png``), and the detector's ROC curves (``roc_png``).
Charts use the learning curves' colours and white page (capsctl/curves.py); images the
inspection pictures' dark page (capsctl/inspection/draw.py).

Shape legend: K kept images, C channels, H/W image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from capsctl.curves import BG, COLOURS, GRID, INK, MINOR, nice_step
from capsctl.errors import CapsctlError
from capsctl.inspection.draw import BAD, DIM_TEXT, MARK, TEXT, canvas, font, save_png, tile, \
    to_tensor

PLOT_W, PLOT_H, LEFT, TOP, GAP = 420, 300, 64, 44, 50


# --- charts ------------------------------------------------------------------------------------

def _panel(d: ImageDraw.ImageDraw, origin: tuple[int, int], title: str, xlabel: str,
           xmax: float, series: list[tuple[tuple, list[tuple[float, float]]]],
           diagonal: bool = False) -> None:
    """A linear panel, y from 0 to 1 (shown in %), x from 0 to ``xmax``: title, grid, and each
    (colour, [(x, y)]) series as a line with dots."""
    x0, y0 = origin
    small = font(11)
    d.text((x0, y0 - 30), title, fill=INK, font=font(13))

    def xy(x: float, y: float) -> tuple[float, float]:
        return x0 + x / xmax * PLOT_W, y0 + PLOT_H - min(max(y, 0.0), 1.0) * PLOT_H

    for k in range(11):
        y = y0 + PLOT_H - k / 10 * PLOT_H
        d.line((x0, y, x0 + PLOT_W, y), fill=GRID if k % 5 == 0 else MINOR)
        d.text((x0 - 6, y), f"{k * 10}%", fill=INK, font=small, anchor="rm")
    step, k = nice_step(xmax, 6), 0
    while k * step <= xmax * 1.0001:
        x = x0 + k * step / xmax * PLOT_W
        d.line((x, y0, x, y0 + PLOT_H), fill=MINOR)
        d.text((x, y0 + PLOT_H + 6), f"{k * step:g}", fill=INK, font=small, anchor="ma")
        k += 1
    d.text((x0 + PLOT_W // 2, y0 + PLOT_H + 22), xlabel, fill=INK, font=small, anchor="ma")
    d.rectangle((x0, y0, x0 + PLOT_W, y0 + PLOT_H), outline=INK)
    if diagonal:
        d.line((*xy(0, 0), *xy(xmax, 1)), fill=GRID, width=1)
    for colour, pts in series:
        line = [xy(x, y) for x, y in pts]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        if not diagonal or len(line) == 1:
            for x, y in line:
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def _chart(title: str, xlabel: str, xmax: float, lines: list[tuple[str, list]], path: Path,
           diagonal: bool = False) -> Path:
    """One panel with a legend under it (one entry per line), written to ``path``."""
    legend_top = TOP + PLOT_H + 48
    img = Image.new("RGB", (LEFT + PLOT_W + 40, legend_top + 18 * len(lines) + 14), BG)
    d = ImageDraw.Draw(img)
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(lines))]
    _panel(d, (LEFT, TOP), title, xlabel, xmax, [(k, pts) for k, (_, pts) in
                                                 zip(colours, lines)], diagonal)
    for i, ((name, _), k) in enumerate(zip(lines, colours)):
        y = legend_top + 18 * i
        d.line((LEFT, y + 6, LEFT + 24, y + 6), fill=k, width=3)
        d.text((LEFT + 32, y + 6), name, fill=INK, font=font(12), anchor="lm")
    return save_png(to_tensor(img), path)


def robustness_png(runs: list[dict], path: Path, eps_unit: str) -> Path:
    """Accuracy under attack against eps: one line per run and method, from eps 0 (the clean
    accuracy). ``runs``: measure results ({"name", "clean_accuracy", "attacks": rows})."""
    lines, xmax = [], 0.0
    scale = 255.0 if eps_unit == "/255" else 1.0
    for run in runs:
        methods = dict.fromkeys(r["label"] for r in run["attacks"])
        for label in methods:
            rows = sorted((r for r in run["attacks"] if r["label"] == label),
                          key=lambda r: r["eps"])
            pts = [(0.0, run["clean_accuracy"])] + [(r["eps"] * scale, r["accuracy"])
                                                    for r in rows]
            xmax = max([xmax] + [x for x, _ in pts])
            lines.append((f"{run['name']}: {label}", pts))
    xmax = nice_step(xmax or 1.0, 6) * max(1, -(-xmax // nice_step(xmax or 1.0, 6)))
    unit = "eps (L-inf, /255)" if eps_unit == "/255" else "eps (L-inf, pixels in [0, 1])"
    return _chart("accuracy under attack", unit, xmax or 1.0, lines, path)


def roc_png(runs: list[dict], path: Path) -> Path:
    """The reconstruction distance's ROC: detection rate against false-positive rate, one line
    per run and attack that has ROC points."""
    lines = [(f"{run['name']}: {r['label']} eps {r['eps']:g} (AUROC {r['auroc']:.3f})",
              r["roc"]) for run in runs for r in run["attacks"]
             if r.get("roc") and r.get("auroc") is not None]
    if not lines:
        raise CapsctlError("--roc: no ROC to draw (the models have no decoder, or no attack "
                           "succeeded)")
    return _chart("detection by reconstruction distance (ROC)", "false-positive rate", 1.0,
                  lines, path, diagonal=True)


# --- images ------------------------------------------------------------------------------------

def _cell(img_CHW: torch.Tensor | None, scale: int, caption: str, wrong: bool) -> Image.Image:
    """An image (or an empty cell) with a caption under it, red when ``wrong``."""
    side_w = (img_CHW.shape[-1] if img_CHW is not None else 28) * scale
    side_h = (img_CHW.shape[-2] if img_CHW is not None else 28) * scale
    cell = canvas(side_w + 4, side_h + 20)
    if img_CHW is not None:
        cell.paste(tile(img_CHW, scale), (2, 2))
    ImageDraw.Draw(cell).text((2, side_h + 5), caption, fill=BAD if wrong else TEXT,
                              font=font(11))
    return cell


def examples_png(collected, attacks: list, names: list[str], path: Path,
                 scale: int = 3) -> Path:
    """One row per kept test image: the image and its reconstruction, then for each attack the
    adversarial image and its reconstruction; each captioned with the predicted class (red:
    wrong). A model without a decoder shows the images only."""
    ex = collected.examples
    y_K, views = ex["y"], [ex["clean"], *ex["adv"]]
    heads = ["clean", "its recon"] + [h for a in attacks for h in
                                      (f"{a.label} {a.eps:g}", "its recon")]
    rows = []
    for k in range(len(y_K)):
        true, cells = int(y_K[k]), []
        for v in views:
            pred = int(v["pred"][k])
            cells += [_cell(v["x"][k], scale, names[pred], pred != true),
                      _cell(v["recon"][k] if v["recon"] is not None else None, scale, "",
                            False)]
        rows.append(cells)
    w, h = rows[0][0].width, rows[0][0].height
    page = canvas(len(heads) * (w + 4) + 8, len(rows) * (h + 4) + 30)
    d = ImageDraw.Draw(page)
    for j, head in enumerate(heads):
        d.text((6 + j * (w + 4), 8), head, fill=MARK if j < 2 else DIM_TEXT, font=font(11))
    for i, cells in enumerate(rows):
        for j, cell in enumerate(cells):
            page.paste(cell, (4 + j * (w + 4), 26 + i * (h + 4)))
    return save_png(to_tensor(page), path)
