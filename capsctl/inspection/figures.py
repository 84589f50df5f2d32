"""Figure layout: where the cells, labels and frames of each picture go.

  pair_grid              inputs above reconstructions (the trainer's TensorBoard image)
  reconstruction_figure  `capsctl reconstruct`: captioned input/reconstruction cells in rows
  perturb_panel          `capsctl perturb`: one example's D x K grid of perturbed decodings
  routes_figure          `capsctl routes`: routing maps per pass and class beside the input
  segmentation_grid      MultiMNIST (the paper's Figure 5): the two digits reconstructed from
                         the two longest capsules, overlaid in red and green

Images in and out are float tensors (3, H, W) in [0, 1]; see draw.py for the look.
Shape legend: B batch, C channels, H W image side, N pixels, J classes, D capsule dimension,
K offsets, R routing passes.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from capsctl.inspection import probe
from capsctl.inspection.draw import (BAD, DIM_TEXT, LINE, MARK, PAGE, TEXT, canvas, diverging,
                                  font, frame, heat_tile, legend, text, tile, titled, to_tensor)

# what a row of routing maps is called, by the model's declared routing_label:
# (row name, symbol, what the passes are)
ROUTING_WORDS = {
    "coupling c_ij": ("coupling, pass", "c_ij", "passes; each map: the coupling to that class"),
    "assignment R": ("assignment R, iteration", "R_ij",
                     "EM iterations; each map: the assignment probability R to that class"),
}


def routing_words(label: str) -> tuple[str, str, str]:
    """(row name, symbol, description of the passes) for a model's ``routing_label``."""
    return ROUTING_WORDS.get(label, (f"{label}, pass", label, f"passes; each map: {label}"))


def pair_grid(inputs: torch.Tensor, recons: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """Inputs (top row) above their reconstructions (bottom row), upscaled by ``scale``:
    (3, H, W) in [0, 1]."""
    x = inputs.detach().float().cpu()
    r = recons.detach().float().cpu().view_as(x)
    grid = make_grid(torch.cat([x, r]), nrow=len(x), padding=1, pad_value=0.5)
    return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).clamp(0, 1)


# --- reconstructions ----------------------------------------------------------------------------

def fit_text(words: str, width: int, size: int = 11) -> str:
    """``words`` cut (with an ellipsis) to fit ``width`` px in the default font at ``size``."""
    f = font(size)
    if f.getlength(words) <= width:
        return words
    while len(words) > 1 and f.getlength(words + "\u2026") > width:
        words = words[:-1]
    return words + "\u2026"


def _title_width(row_titles) -> int:
    """The left margin of the row titles: 22 px (a digit), wider for longer class names."""
    if not row_titles:
        return 0
    if row_titles is True:
        return 22
    return max(22, max(int(font(14).getlength(t)) for t in row_titles) + 12)


def reconstruction_size(side: int, scale: int, rows: list[list[int]],
                        row_titles) -> tuple[int, int]:
    """(width, height) of ``reconstruction_figure``'s grid (without its title lines);
    ``row_titles``: the titles (or True / None as for one-digit titles / none)."""
    s = side * scale
    pitch = 2 * s + 1 + 15 + 1 + (5 if row_titles else 0)
    return (_title_width(row_titles) + max(len(r) for r in rows) * (s + 1) + 1,
            len(rows) * pitch + 2)


def _captions(y: int, p: int, names: list[str] | None, titled_rows: bool,
              cell_w: int) -> list[tuple[float, str]]:
    """(position across the cell, words) of a cell's caption: "y<label> p<prediction>"; with
    class names under class rows just the prediction's name (the row names the label)."""
    if names is None:
        return [(0.28, f"y{y}"), (0.72, f"p{p}")]
    if titled_rows:
        return [(0.5, fit_text(names[p], cell_w - 4))]
    return [(0.28, fit_text(f"y{names[y]}", cell_w // 2 - 2)),
            (0.72, fit_text(f"p{names[p]}", cell_w // 2 - 2))]


def reconstruction_figure(x_BCHW, recon_BCHW, y_B, pred_B, rows: list[list[int]],
                          row_titles: list[str] | None, title: list[str],
                          scale: int = 2, names: list[str] | None = None) -> torch.Tensor:
    """Cells of (input above its reconstruction, caption "y<label> p<prediction>"), one list of
    batch positions per row (``row_titles``: each row's class name); mistakes framed and
    captioned in red. With class ``names`` captions name the classes (under titled rows: the
    prediction only). Returns (3, H, W)."""
    s = x_BCHW.shape[-1] * scale
    cap = 15
    cell_w, cell_h = s, 2 * s + 1 + cap
    cols = max(len(r) for r in rows)
    left = _title_width(row_titles)
    pitch = cell_h + 1 + (5 if row_titles else 0)   # a little air between class rows
    grid = canvas(left + cols * (cell_w + 1) + 1, len(rows) * pitch + 2)
    draw = ImageDraw.Draw(grid)
    y_l, p_l = y_B.tolist(), pred_B.tolist()
    for r, members in enumerate(rows):
        y0 = 1 + r * pitch
        if row_titles:
            text(draw, (left // 2, y0 + s), row_titles[r], 14, TEXT, "mm")
        draw.rectangle((left, y0 - 1, left + len(members) * (cell_w + 1), y0 + cell_h), fill=LINE)
        for c, b in enumerate(members):
            x0 = left + 1 + c * (cell_w + 1)
            grid.paste(tile(x_BCHW[b], scale), (x0, y0))
            grid.paste(tile(recon_BCHW[b], scale), (x0, y0 + s + 1))
            draw.rectangle((x0, y0 + 2 * s + 1, x0 + cell_w - 1, y0 + cell_h - 1), fill=PAGE)
            wrong = y_l[b] != p_l[b]
            for frac, words in _captions(y_l[b], p_l[b], names, bool(row_titles), cell_w):
                text(draw, (x0 + round(cell_w * frac), y0 + 2 * s + 1 + cap // 2), words, 11,
                     BAD if wrong else DIM_TEXT, "mm")
            if wrong:
                frame(draw, (x0, y0, x0 + cell_w, y0 + cell_h), BAD)
    return to_tensor(titled(grid, title))


# --- perturbations (Figure 4) -------------------------------------------------------------------

PERTURB_LEFT, PERTURB_HEAD = 66, 16


def perturb_panel_size(D: int, K: int, side: int, scale: int) -> tuple[int, int]:
    """(width, height) of ``perturb_panel`` for D dimensions, K offsets, images ``side`` px."""
    s = side * scale
    return PERTURB_LEFT + K * (s + 1) + 1, (s + 8) + PERTURB_HEAD + D * (s + 1) + 1


def perturb_panel(recon_DKCHW: torch.Tensor, offsets_K: torch.Tensor, change_D: torch.Tensor,
                  input_CHW: torch.Tensor, lines: list[str], scale: int = 2,
                  top: int = 3) -> Image.Image:
    """One example's D x K grid: a row per dimension (label: dimension and its change), a column
    per offset (header), the unperturbed column framed; the input beside the title. Returns a
    PIL image."""
    D, K = recon_DKCHW.shape[:2]
    s = recon_DKCHW.shape[-1] * scale
    left, head = PERTURB_LEFT, PERTURB_HEAD
    width = left + K * (s + 1) + 1
    grid = canvas(width, head + D * (s + 1) + 1)
    draw = ImageDraw.Draw(grid)
    draw.rectangle((left, head, width - 1, grid.height - 1), fill=LINE)
    strongest = set(torch.argsort(change_D, descending=True)[:top].tolist())
    for k, o in enumerate(offsets_K.tolist()):
        label = "0" if k == K // 2 else f"{o:+.2f}".replace("0.", ".")
        text(draw, (left + 1 + k * (s + 1) + s // 2, head // 2), label, 11,
             MARK if k == K // 2 else DIM_TEXT, "mm")
    for d in range(D):
        y0 = head + 1 + d * (s + 1)
        colour = MARK if d in strongest else DIM_TEXT
        text(draw, (4, y0 + s // 2), f"d{d}", 12, colour, "lm")
        text(draw, (left - 6, y0 + s // 2), f"{1000 * float(change_D[d]):.1f}", 11, colour, "rm")
        for k in range(K):
            grid.paste(tile(recon_DKCHW[d, k], scale), (left + 1 + k * (s + 1), y0))
    x0 = left + (K // 2) * (s + 1)
    frame(draw, (x0, head, x0 + s + 2, grid.height), MARK)
    header = canvas(width, s + 8)
    hd = ImageDraw.Draw(header)
    header.paste(tile(input_CHW, scale), (left + 1, 4))
    for i, t in enumerate(lines):
        text(hd, (left + s + 12, 6 + i * 17), t, 13 if i == 0 else 12,
             TEXT if i == 0 else DIM_TEXT)
    text(hd, (4, 6), "input", 11, DIM_TEXT)
    panel = canvas(width, header.height + grid.height)
    panel.paste(header, (0, 0))
    panel.paste(grid, (0, header.height))
    return panel


# --- routing ------------------------------------------------------------------------------------

def routes_figure(x_CHW: torch.Tensor, grid_RJHW: torch.Tensor, agree_JHW: torch.Tensor | None,
                  scores_J: torch.Tensor, label: int | None, title: list[str],
                  scale: int = 3, score_name: str = "|v|",
                  rows_named: tuple[str, str] = ("coupling, pass", "c_ij"),
                  names: list[str] | None = None) -> torch.Tensor:
    """The input on the left; one heat map per (routing pass, class) of the mean coupling on the
    primary grid, drawn as its departure from the uniform start 1/J (black: 1/J, orange: more,
    blue: less; one scale for all passes), then a row of the agreement per class (orange agrees,
    blue disagrees); each column headed by its class name (``names``; default the class
    numbers), the predicted class's marked. ``rows_named``: what a row of maps is
    ("coupling, pass" and "c_ij"; EM: "assignment R, iteration" and "R_ij"). Returns
    (3, H, W)."""
    R, J = grid_RJHW.shape[:2]
    s = x_CHW.shape[-1] * scale
    hs = heat_tile(grid_RJHW[0, :1].expand(3, -1, -1), s).width
    left, head = 118, 34
    rows = R + (1 if agree_JHW is not None else 0)
    x_in = 8
    gx = x_in + s + 16 + left
    width = gx + J * (hs + 1) + 1 + 8
    height = head + rows * (hs + 1) + 1 + 30
    page = canvas(width, max(height, head + s + 60))
    draw = ImageDraw.Draw(page)
    pred = int(scores_J.argmax())
    page.paste(tile(x_CHW, scale), (x_in, head))
    frame(draw, (x_in - 1, head - 1, x_in + s + 1, head + s + 1), LINE, 1)
    names = names or [str(j) for j in range(J)]
    caption = f"label {names[label]}" if label is not None else "input"
    text(draw, (x_in, head + s + 6), fit_text(caption, s + 12, 12), 12, TEXT)
    text(draw, (x_in, head + s + 22), fit_text(f"predicted {names[pred]}", s + 12, 12), 12,
         BAD if label is not None and label != pred else TEXT)
    draw.rectangle((gx, head, gx + J * (hs + 1), head + rows * (hs + 1)), fill=LINE)
    for j in range(J):
        cx = gx + 1 + j * (hs + 1) + hs // 2
        colour = MARK if j == pred else DIM_TEXT
        text(draw, (cx, 9), fit_text(names[j], hs, 13), 13, colour, "mm")
        text(draw, (cx, 24), f"{score_name} {float(scores_J[j]):.2f}", 11, colour, "mm")
    uniform = 1.0 / J
    c_limit = max(float((grid_RJHW - uniform).abs().max()), 1e-6)
    a_limit = max(float(agree_JHW.abs().max()), 1e-12) if agree_JHW is not None else None
    for r in range(rows):
        y0 = head + 1 + r * (hs + 1)
        if r < R:
            name, sub = f"{rows_named[0]} {r + 1}", f"{rows_named[1]} - 1/J, mean of types"
        else:
            name, sub = "agreement", "u_hat . v, sum of types"
        text(draw, (gx - 8, y0 + hs // 2 - 8), name, 12, TEXT, "rm")
        text(draw, (gx - 8, y0 + hs // 2 + 8), sub, 10, DIM_TEXT, "rm")
        for j in range(J):
            rgb = (diverging(grid_RJHW[r, j] - uniform, c_limit) if r < R
                   else diverging(agree_JHW[j], a_limit))
            page.paste(heat_tile(rgb, s), (gx + 1 + j * (hs + 1), y0))
    px = gx + 1 + pred * (hs + 1)
    frame(draw, (px - 1, head - 1, px + hs + 1, head + rows * (hs + 1) + 2), MARK)
    bars = [(rows_named[0].split(",")[0], uniform - c_limit, uniform + c_limit,
             f"(black = 1/{J})")]
    if a_limit is not None:
        bars.append(("agreement", -a_limit, a_limit, "(black = 0)"))
    legend(draw, page, gx, head + rows * (hs + 1) + 10, bars)
    return to_tensor(titled(page, title))


# --- MultiMNIST segmentation (Figure 5) ---------------------------------------------------------
# For each example, one column: the input; the two digits reconstructed from the two longest
# capsules, overlaid in red (longest) and green (second), pixel values clipped at 1; and, only
# when the pair is wrong, the reconstruction from the two true labels (red = L's first label,
# green = its second). The caption gives the labels (L) and the prediction (P); a wrong pair is
# captioned in red and its third picture is marked "*".

GAP, CAPTION, FONT_SIZE = 4, 30, 13
BG, FAIL_RGB, OK_RGB = (48, 48, 48), (255, 90, 90), (235, 235, 235)


def _overlay(recon_B2N: torch.Tensor, side: int) -> torch.Tensor:
    """(B, 2, N) -> (B, 3, side, side): first reconstruction red, second green, clipped at 1."""
    r = recon_B2N.float().clamp(0, 1).view(-1, 2, side, side)
    return torch.stack([r[:, 0], r[:, 1], torch.zeros_like(r[:, 0])], 1)


@torch.no_grad()
def segmentation_grid(model, x: torch.Tensor, y_B2: torch.Tensor, device: torch.device,
                      scale: int = 3, columns: int = 8) -> torch.Tensor:
    """The Figure-5 picture of two-digit images ``x`` whose labels are ``y_B2`` (B, 2) (the
    pair task's ``model_labels``): (3, H, W) in [0, 1].

    ``model`` must declare a decoder (``model.has_decoder``); it is put in eval mode for the
    picture and back in its previous mode after.
    """
    was = model.training
    model.eval()
    try:
        x = x.to(device).float()
        y_B2 = y_B2.to(device)
        pred_B2, recon_pred, recon_true = probe.segmentation_recons(model, x, y_B2)
    finally:
        model.train(was)
    side = x.shape[-1]
    wrong_B = (torch.sort(pred_B2, 1).values != torch.sort(y_B2, 1).values).any(1)
    inputs = x[:, :1].clamp(0, 1).expand(-1, 3, -1, -1)
    tiles = torch.stack([inputs, _overlay(recon_pred, side), _overlay(recon_true, side)], 1)
    tiles[~wrong_B, 2] = 0.0  # the true-label picture only for failures
    return _segmentation_draw(tiles.cpu(), y_B2.cpu().tolist(), pred_B2.cpu().tolist(),
                              wrong_B.cpu().tolist(), scale, columns)


def _segmentation_draw(tiles: torch.Tensor, labels, preds, wrong, scale: int,
                       columns: int) -> torch.Tensor:
    """tiles (B, 3 pictures, 3, S, S) -> the captioned grid as a (3, H, W) tensor."""
    B, P, _, S, _ = tiles.shape
    cell = S * scale
    cols = min(columns, B)
    rows = (B + cols - 1) // cols
    cell_h = P * cell + (P - 1) * GAP + CAPTION
    page = canvas(cols * cell + (cols + 1) * GAP, rows * cell_h + (rows + 1) * GAP, BG)
    draw = ImageDraw.Draw(page)
    f = font(FONT_SIZE)
    big = tiles.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    for b in range(B):
        x0 = GAP + (b % cols) * (cell + GAP)
        y0 = GAP + (b // cols) * (cell_h + GAP)
        for p in range(P):
            if p == 2 and not wrong[b]:
                continue
            page.paste(Image.fromarray(np.ascontiguousarray(pixels[b, p])),
                       (x0, y0 + p * (cell + GAP)))
        if wrong[b]:
            draw.text((x0 + 3, y0 + 2 * (cell + GAP) + 1), "*", fill=FAIL_RGB, font=f)
        ty = y0 + P * cell + (P - 1) * GAP + 1
        colour = FAIL_RGB if wrong[b] else OK_RGB
        draw.text((x0 + 2, ty), f"L:({labels[b][0]},{labels[b][1]})", fill=colour, font=f)
        draw.text((x0 + 2, ty + 14), f"P:({preds[b][0]},{preds[b][1]})", fill=colour, font=f)
    return torch.from_numpy(np.asarray(page).copy()).permute(2, 0, 1).float().div_(255.0)
