"""Pictures of what the capsules learned: reconstructions, perturbed capsule dimensions (the
paper's Figure 4) and the coupling coefficients of routing by agreement.

Every picture is drawn the same way: white digits on black, pixels upscaled by an integer factor
(nearest neighbour), a thin grey line between cells, labels in PIL's default font on a dark page,
mistakes framed and captioned in red. Images are float tensors (3, H, W) in [0, 1]; ``save_png``
writes them. The ``run_*`` functions are what the CLI calls: checkpoint in, PNG (and TensorBoard
image) out, a summary dict back.

Shape legend (suffixes on tensor names):
  B batch   C image channels   H, W image (or primary grid) side   N pixels (C*H*W)
  I child capsules   J parent (class) capsules   D class capsule dimension
  T capsule types   R routing passes   K perturbation offsets
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from capsctl.errors import CapsctlError

PAGE = (22, 22, 22)        # background around the cells
LINE = (90, 90, 90)        # thin border between cells
TEXT = (225, 225, 225)
DIM_TEXT = (150, 150, 150)
BAD = (255, 70, 70)        # mistakes
MARK = (255, 196, 0)       # the unperturbed column, the predicted class, the strongest dimensions
# diverging colours: black at zero, the first colour at KNEE of the range, the second at its end
POS, NEG, KNEE = ((255, 150, 20), (255, 240, 170)), ((60, 130, 255), (190, 225, 255)), 0.55


def pair_grid(inputs: torch.Tensor, recons: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """Inputs (top row) above their reconstructions (bottom row), upscaled by ``scale``."""
    x = inputs.detach().float().cpu()
    r = recons.detach().float().cpu().view_as(x)
    grid = make_grid(torch.cat([x, r]), nrow=len(x), padding=1, pad_value=0.5)
    return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).clamp(0, 1)


# --- drawing primitives -------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def font(size: int = 12):
    """PIL's default font at ``size`` px (older Pillow: its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def tile(img_CHW: torch.Tensor, scale: int) -> Image.Image:
    """A (1 or 3, H, W) float image in [0, 1] -> RGB PIL image upscaled ``scale`` x (nearest)."""
    img = img_CHW.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def save_png(image_3HW: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) float image in [0, 1] as a PNG (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (image_3HW.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    try:
        Image.fromarray(np.ascontiguousarray(arr), "RGB").save(path, format="PNG")
    except OSError as e:
        raise CapsctlError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def diverging(values: torch.Tensor, limit: float) -> torch.Tensor:
    """Black at zero, through orange to pale yellow at +``limit``, through blue to pale blue at
    -``limit`` (piecewise linear) -> (3, ...)."""
    t = (values.float() / max(limit, 1e-12)).clamp(-1, 1).unsqueeze(-1)
    a = t.abs()
    out = []
    for ramp in (POS, NEG):
        mid, end = (torch.tensor(c, dtype=torch.float32) / 255 for c in ramp)
        low = a / KNEE * mid
        high = mid + (a - KNEE) / (1 - KNEE) * (end - mid)
        out.append(torch.where(a <= KNEE, low, high))
    return torch.where(t >= 0, out[0], out[1]).movedim(-1, 0)


def heat_tile(rgb_3HW: torch.Tensor, side_px: int) -> Image.Image:
    """A coloured grid upscaled by whole cells to about ``side_px`` pixels."""
    cell = max(4, round(side_px / max(rgb_3HW.shape[1:])))
    return tile(rgb_3HW, cell)


def _frame(draw: ImageDraw.ImageDraw, box, colour, width: int = 2) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=width)


def _text(draw, xy, text, size=12, fill=TEXT, anchor="la") -> None:
    draw.text(xy, text, fill=fill, font=font(size), anchor=anchor)


def _stack(images: list[Image.Image], columns: int, gap: int = 12) -> Image.Image:
    """Panels (any sizes) left to right in rows of ``columns``, on the page colour."""
    rows = [images[i:i + columns] for i in range(0, len(images), columns)]
    width = max(sum(im.width for im in r) + gap * (len(r) + 1) for r in rows)
    height = sum(max(im.height for im in r) for r in rows) + gap * (len(rows) + 1)
    page = Image.new("RGB", (width, height), PAGE)
    y = gap
    for r in rows:
        x = gap
        for im in r:
            page.paste(im, (x, y))
            x += im.width + gap
        y += max(im.height for im in r) + gap
    return page


def _titled(body: Image.Image, lines: list[str], size: int = 13, pad: int = 8) -> Image.Image:
    """``body`` under a few lines of text."""
    line_h = size + 5
    width = max(body.width + 2 * pad, max((int(font(size).getlength(t)) for t in lines),
                                          default=0) + 2 * pad)
    page = Image.new("RGB", (width, body.height + len(lines) * line_h + 2 * pad), PAGE)
    draw = ImageDraw.Draw(page)
    for k, t in enumerate(lines):
        _text(draw, (pad, pad + k * line_h), t, size, TEXT if k == 0 else DIM_TEXT)
    page.paste(body, (pad, pad + len(lines) * line_h))
    return page


# --- reconstructions ----------------------------------------------------------------------------

def require_decoder(model, what: str) -> None:
    if not isinstance(getattr(model, "decoder", None), torch.nn.Module):
        raise CapsctlError(f"{what} needs a model with a reconstruction decoder; this "
                           f"{type(model).__name__} has none (trained with model.decoder: "
                           "false, or not a capsule model)")


def capsules(out: dict) -> torch.Tensor:
    """The class capsules (B, J, D) the decoder reads: CapsNet's vectors ``v`` or a matrix
    capsule model's flattened poses ``pose``."""
    for key in ("v", "pose"):
        if key in out:
            return out[key].float()
    raise CapsctlError("this model's output has no class capsules (no 'v' or 'pose')")


def decode(model, caps_BJD: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
    """The decoder's reconstruction (B, N) from the capsule of ``classes_B`` alone (the others
    masked to zero), as in training."""
    mask_BJ = torch.nn.functional.one_hot(classes_B, caps_BJD.shape[1]).to(caps_BJD.dtype)
    return model.decoder(caps_BJD * mask_BJ.unsqueeze(-1)).float()


@torch.no_grad()
def reconstruct_batch(model, x_BCHW: torch.Tensor, y_B: torch.Tensor, mask: str = "predicted"):
    """(recon (B, C, H, W), prediction (B,), scores (B, J)); the decoder sees only the capsule of
    the prediction (``mask="predicted"``) or of the label (``"label"``)."""
    require_decoder(model, "reconstruction")
    out = model(x_BCHW)
    scores_BJ = out["scores"].float()
    pred_B = scores_BJ.argmax(1)
    classes_B = y_B if mask == "label" else pred_B
    recon_BN = decode(model, capsules(out), classes_B)
    return recon_BN.view_as(x_BCHW), pred_B, scores_BJ


def reconstruction_figure(x_BCHW, recon_BCHW, y_B, pred_B, rows: list[list[int]],
                          row_titles: list[str] | None, title: list[str],
                          scale: int = 2) -> torch.Tensor:
    """Cells of (input above its reconstruction, caption "y<label> p<prediction>"), one list of
    batch positions per row; mistakes framed and captioned in red."""
    s = x_BCHW.shape[-1] * scale
    cap = 15
    cell_w, cell_h = s, 2 * s + 1 + cap
    cols = max(len(r) for r in rows)
    left = 22 if row_titles else 0
    pitch = cell_h + 1 + (5 if row_titles else 0)   # a little air between class rows
    grid = Image.new("RGB", (left + cols * (cell_w + 1) + 1, len(rows) * pitch + 2), PAGE)
    draw = ImageDraw.Draw(grid)
    y_l, p_l = y_B.tolist(), pred_B.tolist()
    for r, members in enumerate(rows):
        y0 = 1 + r * pitch
        if row_titles:
            _text(draw, (left // 2, y0 + s), row_titles[r], 14, TEXT, "mm")
        draw.rectangle((left, y0 - 1, left + len(members) * (cell_w + 1), y0 + cell_h), fill=LINE)
        for c, b in enumerate(members):
            x0 = left + 1 + c * (cell_w + 1)
            grid.paste(tile(x_BCHW[b], scale), (x0, y0))
            grid.paste(tile(recon_BCHW[b], scale), (x0, y0 + s + 1))
            draw.rectangle((x0, y0 + 2 * s + 1, x0 + cell_w - 1, y0 + cell_h - 1), fill=PAGE)
            wrong = y_l[b] != p_l[b]
            for frac, text in ((0.28, f"y{y_l[b]}"), (0.72, f"p{p_l[b]}")):
                _text(draw, (x0 + round(cell_w * frac), y0 + 2 * s + 1 + cap // 2), text, 11,
                      BAD if wrong else DIM_TEXT, "mm")
            if wrong:
                _frame(draw, (x0, y0, x0 + cell_w, y0 + cell_h), BAD)
    return to_tensor(_titled(grid, title))


# --- perturbations (Figure 4) -------------------------------------------------------------------

def offsets_for(range_: float, step: float) -> torch.Tensor:
    """-range .. +range in steps of ``step``, with an exact 0 in the middle: (K,)."""
    if not (step > 0 and range_ > 0):
        raise CapsctlError(f"--range {range_} and --step {step} must both be > 0")
    k = round(range_ / step)
    if k < 1 or abs(k * step - range_) > 1e-6 * max(1.0, range_):
        raise CapsctlError(f"--range {range_} must be a whole multiple of --step {step} "
                           "(e.g. --range 0.25 --step 0.05)")
    if k > 50:
        raise CapsctlError(f"--range/--step gives {2 * k + 1} columns; at most 101")
    return torch.arange(-k, k + 1, dtype=torch.float32) * step


@torch.no_grad()
def perturbations(model, v_JD: torch.Tensor, cls: int, offsets_K: torch.Tensor) -> torch.Tensor:
    """Decode capsule ``cls`` of one example with offsets added to one dimension at a time (the
    other capsules masked): recon (D, K, N). Column ``K // 2`` (offset 0) is the plain
    reconstruction."""
    require_decoder(model, "perturb")
    J, D = v_JD.shape
    K = offsets_K.numel()
    eye_DD = torch.eye(D, device=v_JD.device, dtype=v_JD.dtype)
    delta_DKD = offsets_K.to(v_JD.device, v_JD.dtype).view(1, K, 1) * eye_DD.view(D, 1, D)
    v_DKJD = v_JD.expand(D, K, J, D).clone()
    v_DKJD[:, :, cls] += delta_DKD
    classes = torch.full((D * K,), cls, dtype=torch.long, device=v_JD.device)
    recon = decode(model, v_DKJD.reshape(D * K, J, D), classes)
    return recon.float().view(D, K, -1)


def dimension_change(recon_DKN: torch.Tensor) -> torch.Tensor:
    """Per dimension, the mean absolute pixel change from the unperturbed reconstruction over the
    non-zero offsets: (D,)."""
    D, K, _ = recon_DKN.shape
    diff_DKN = (recon_DKN - recon_DKN[:, K // 2:K // 2 + 1]).abs()
    return diff_DKN.mean(-1).sum(1) / max(K - 1, 1)


def perturb_panel(recon_DKCHW: torch.Tensor, offsets_K: torch.Tensor, change_D: torch.Tensor,
                  input_CHW: torch.Tensor, lines: list[str], scale: int = 2,
                  top: int = 3) -> Image.Image:
    """One example's D x K grid: a row per dimension (label: dimension and its change), a column
    per offset (header), the unperturbed column framed; the input beside the title."""
    D, K = recon_DKCHW.shape[:2]
    s = recon_DKCHW.shape[-1] * scale
    left, head = 66, 16
    width = left + K * (s + 1) + 1
    grid = Image.new("RGB", (width, head + D * (s + 1) + 1), PAGE)
    draw = ImageDraw.Draw(grid)
    draw.rectangle((left, head, width - 1, grid.height - 1), fill=LINE)
    strongest = set(torch.argsort(change_D, descending=True)[:top].tolist())
    for k, o in enumerate(offsets_K.tolist()):
        label = "0" if k == K // 2 else f"{o:+.2f}".replace("0.", ".")
        _text(draw, (left + 1 + k * (s + 1) + s // 2, head // 2), label, 11,
              MARK if k == K // 2 else DIM_TEXT, "mm")
    for d in range(D):
        y0 = head + 1 + d * (s + 1)
        colour = MARK if d in strongest else DIM_TEXT
        _text(draw, (4, y0 + s // 2), f"d{d}", 12, colour, "lm")
        _text(draw, (left - 6, y0 + s // 2), f"{1000 * float(change_D[d]):.1f}", 11, colour,
              "rm")
        for k in range(K):
            grid.paste(tile(recon_DKCHW[d, k], scale), (left + 1 + k * (s + 1), y0))
    x0 = left + (K // 2) * (s + 1)
    _frame(draw, (x0, head, x0 + s + 2, grid.height), MARK)
    header = Image.new("RGB", (width, s + 8), PAGE)
    hd = ImageDraw.Draw(header)
    header.paste(tile(input_CHW, scale), (left + 1, 4))
    for i, t in enumerate(lines):
        _text(hd, (left + s + 12, 6 + i * 17), t, 13 if i == 0 else 12,
              TEXT if i == 0 else DIM_TEXT)
    _text(hd, (4, 6), "input", 11, DIM_TEXT)
    panel = Image.new("RGB", (width, header.height + grid.height), PAGE)
    panel.paste(header, (0, 0))
    panel.paste(grid, (0, header.height))
    return panel


# --- routing ------------------------------------------------------------------------------------

def require_routing(model) -> tuple[int, int, int]:
    layout = getattr(model, "routing_layout", None)
    if layout is None:
        raise CapsctlError(f"routes needs a capsule model with routing between capsule layers; "
                           f"this {type(model).__name__} has none (e.g. a CNN baseline)")
    return tuple(int(n) for n in layout)


@torch.no_grad()
def routing_maps(model, x_BCHW: torch.Tensor) -> dict:
    """Coupling coefficients of every routing pass and the agreement of the predictions.

    Returns ``coupling`` (B, R, I, J), ``coupling_grid`` (B, R, J, H, W) (the mean over the T
    capsule types at each grid position; sums to one over J like c itself), ``scores`` (B, J),
    and, for models whose children are ``model.primary``'s output with predictions
    ``model.digits.predictions(u)``: ``agreement`` (B, I, J) = u_hat_j|i . v_j with the final v
    and ``agreement_grid`` (B, J, H, W) summed over types. Child i is type i // (H W) at row
    (i // W) % H, column i % W (``model.routing_layout`` = (T, H, W)).
    """
    T, H, W = require_routing(model)
    captured = {}
    primary = getattr(model, "primary", None)
    hook = (primary.register_forward_hook(lambda m, a, o: captured.__setitem__("u", o))
            if isinstance(primary, torch.nn.Module) else None)
    try:
        out = model(x_BCHW, keep_routing=True)
    finally:
        if hook is not None:
            hook.remove()
    passes = out.get("routing") or []
    if not passes:
        raise CapsctlError(f"routes: this {type(model).__name__} returned no coupling "
                           "coefficients (no routing between capsule layers)")
    c_BRIJ = torch.stack([c.float() for c in passes], 1)
    B, R, I, J = c_BRIJ.shape
    if I != T * H * W:
        raise CapsctlError(f"routes: the model routes {I} children but its layout {T}x{H}x{W} "
                           f"describes {T * H * W}")
    grid = c_BRIJ.view(B, R, T, H, W, J).mean(2).permute(0, 1, 4, 2, 3)
    result = {"coupling": c_BRIJ, "coupling_grid": grid, "scores": out["scores"].float(),
              "layout": (T, H, W), "score_name": "|v|" if "v" in out else "a"}
    digits = getattr(model, "digits", None)
    if "u" in captured and hasattr(digits, "predictions") and "v" in out:
        u_hat_BIJD = digits.predictions(captured["u"]).float()
        a_BIJ = torch.einsum("bijd,bjd->bij", u_hat_BIJD, out["v"].float())
        result["agreement"] = a_BIJ
        result["agreement_grid"] = a_BIJ.view(B, T, H, W, J).sum(1).permute(0, 3, 1, 2)
    return result


def routes_figure(x_CHW: torch.Tensor, grid_RJHW: torch.Tensor, agree_JHW: torch.Tensor | None,
                  scores_J: torch.Tensor, label: int | None, title: list[str],
                  scale: int = 3, score_name: str = "|v|",
                  rows_named: tuple[str, str] = ("coupling, pass", "c_ij")) -> torch.Tensor:
    """The input on the left; one heat map per (routing pass, class) of the mean coupling on the
    primary grid, drawn as its departure from the uniform start 1/J (black: 1/J, orange: more,
    blue: less; one scale for all passes), then a row of the agreement per class (orange agrees,
    blue disagrees); the predicted class's column marked. ``rows_named``: what a row of maps is
    ("coupling, pass" and "c_ij"; EM: "assignment R, iteration" and "R_ij")."""
    R, J = grid_RJHW.shape[:2]
    s = x_CHW.shape[-1] * scale
    hs = heat_tile(grid_RJHW[0, :1].expand(3, -1, -1), s).width
    left, head = 118, 34
    rows = R + (1 if agree_JHW is not None else 0)
    x_in = 8
    gx = x_in + s + 16 + left
    width = gx + J * (hs + 1) + 1 + 8
    height = head + rows * (hs + 1) + 1 + 30
    page = Image.new("RGB", (width, max(height, head + s + 60)), PAGE)
    draw = ImageDraw.Draw(page)
    pred = int(scores_J.argmax())
    page.paste(tile(x_CHW, scale), (x_in, head))
    _frame(draw, (x_in - 1, head - 1, x_in + s + 1, head + s + 1), LINE, 1)
    caption = f"label {label}" if label is not None else "input"
    _text(draw, (x_in, head + s + 6), caption, 12, TEXT)
    _text(draw, (x_in, head + s + 22), f"predicted {pred}", 12,
          BAD if label is not None and label != pred else TEXT)
    draw.rectangle((gx, head, gx + J * (hs + 1), head + rows * (hs + 1)), fill=LINE)
    for j in range(J):
        cx = gx + 1 + j * (hs + 1) + hs // 2
        colour = MARK if j == pred else DIM_TEXT
        _text(draw, (cx, 9), f"{j}", 13, colour, "mm")
        _text(draw, (cx, 24), f"{score_name} {float(scores_J[j]):.2f}", 11, colour, "mm")
    uniform = 1.0 / J
    c_limit = max(float((grid_RJHW - uniform).abs().max()), 1e-6)
    a_limit = max(float(agree_JHW.abs().max()), 1e-12) if agree_JHW is not None else None
    for r in range(rows):
        y0 = head + 1 + r * (hs + 1)
        if r < R:
            name, sub = f"{rows_named[0]} {r + 1}", f"{rows_named[1]} - 1/J, mean of types"
        else:
            name, sub = "agreement", "u_hat . v, sum of types"
        _text(draw, (gx - 8, y0 + hs // 2 - 8), name, 12, TEXT, "rm")
        _text(draw, (gx - 8, y0 + hs // 2 + 8), sub, 10, DIM_TEXT, "rm")
        for j in range(J):
            rgb = (diverging(grid_RJHW[r, j] - uniform, c_limit) if r < R
                   else diverging(agree_JHW[j], a_limit))
            page.paste(heat_tile(rgb, s), (gx + 1 + j * (hs + 1), y0))
    px = gx + 1 + pred * (hs + 1)
    _frame(draw, (px - 1, head - 1, px + hs + 1, head + rows * (hs + 1) + 2), MARK)
    bars = [(rows_named[0].split(",")[0], uniform - c_limit, uniform + c_limit,
             f"(black = 1/{J})")]
    if a_limit is not None:
        bars.append(("agreement", -a_limit, a_limit, "(black = 0)"))
    _legend(draw, page, gx, head + rows * (hs + 1) + 10, bars)
    return to_tensor(_titled(page, title))


def _legend(draw, page, x: int, y: int, bars) -> None:
    """Diverging colour bars: (name, low value, high value, note) each."""
    bar_w, bar_h, f = 140, 10, font(11)
    for name, lo, hi, note in bars:
        mid = y + bar_h // 2
        ramp = diverging(torch.linspace(-1, 1, bar_w).view(1, -1), 1.0)
        for text, gap in ((name, 10), (f"{lo:.3g}", 4)):
            _text(draw, (x, mid), text, 11, DIM_TEXT, "lm")
            x += int(f.getlength(text)) + gap
        page.paste(tile(ramp, 1).resize((bar_w, bar_h), Image.NEAREST), (x, y))
        x += bar_w + 4
        for text, gap in ((f"{hi:.3g}", 6), (note, 30)):
            _text(draw, (x, mid), text, 11, DIM_TEXT, "lm")
            x += int(f.getlength(text)) + gap


# --- from a checkpoint: what the commands run ---------------------------------------------------

def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint: RUN for RUN/checkpoints/X.pt or a folder argument."""
    p = Path(checkpoint)
    if p.is_dir():
        return p
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def _load(checkpoint, device_name: str | None):
    from capsctl.checkpoint import load_model
    from capsctl.device import resolve

    device = resolve(device_name or "auto")
    model, cfg, state = load_model(checkpoint, device)
    return model, cfg, state, device


def _source(cfg, dataset: str | None, split: str, device, data_root):
    from capsctl.data import build_eval

    if split not in ("test", "val"):
        raise CapsctlError(f"--split {split!r}: expected test or val")
    return build_eval(dataset or cfg.data.dataset, split, cfg, device,
                      str(data_root) if data_root else None)


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


@torch.no_grad()
def confident_examples(model, source, classes: list[int], device, pool: int = 1000,
                       batch_size: int = 250) -> dict[int, int]:
    """For each class, the index (among the first ``pool`` examples) of the correctly classified
    example with the longest capsule of that class (or, if none is correct, the longest)."""
    n = min(pool, len(source))
    scores, labels = [], []
    for start in range(0, n, batch_size):
        batch = source.get(torch.arange(start, min(start + batch_size, n), device=device))
        scores.append(model(batch["x"])["scores"].float())
        labels.append(batch["y"])
    scores_BJ, y_B = torch.cat(scores), torch.cat(labels)
    right_B = scores_BJ.argmax(1) == y_B
    picks = {}
    for k in classes:
        of_k = y_B == k
        if not bool(of_k.any()):
            raise CapsctlError(f"no example of class {k} among the first {n} of the split; "
                               "choose one with --index")
        eligible = of_k & right_B if bool((of_k & right_B).any()) else of_k
        picks[k] = int(torch.where(eligible, scores_BJ[:, k], -1.0).argmax())
    return picks


def _write(image: torch.Tensor, out: str | Path | None, default_name: str, checkpoint,
           tb: str | Path | None, no_tb: bool, tag: str, step: int) -> dict:
    png = Path(out) if out else run_folder(checkpoint) / default_name
    save_png(image, png)
    written = {"png": str(png), "tensorboard": None}
    if not no_tb:
        from torch.utils.tensorboard import SummaryWriter

        tb_dir = Path(tb) if tb else run_folder(checkpoint) / "tb"
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


def run_reconstruct(checkpoint, dataset=None, split="test", n=16, indices=None,
                    by_class=True, mask="predicted", seed=0, out=None, tb=None, no_tb=False,
                    device=None, data_root=None, scale=2) -> dict:
    """Inputs above their reconstructions: one row per true class (``n`` each, drawn with
    ``seed``), or a plain grid of ``n`` random examples or of ``indices``. MultiMNIST checkpoints
    get the segmentation picture instead."""
    if mask not in ("predicted", "label"):
        raise CapsctlError(f"--mask {mask!r}: expected predicted or label")
    if n < 1 or scale < 1:
        raise CapsctlError("--n and --scale must be >= 1")
    model, cfg, state, dev = _load(checkpoint, device)
    require_decoder(model, "reconstruct")
    name = dataset or cfg.data.dataset
    source = _source(cfg, dataset, split, dev, data_root)
    g = torch.Generator().manual_seed(seed)
    if name == "multimnist":
        return _run_segmentation(model, cfg, state, source, indices, n, g, dev, checkpoint,
                                 out, tb, no_tb, split)
    if indices:
        chosen, rows_of = list(indices), None
    elif by_class:
        y_all = source.get(torch.arange(len(source), device=dev))["y"].cpu()
        rows_of, chosen = [], []
        for k in range(cfg.model.num_classes):
            members = torch.nonzero(y_all == k).flatten()
            pick = members[torch.randperm(len(members), generator=g)[:n]].sort().values.tolist()
            if pick:
                rows_of.append((k, list(range(len(chosen), len(chosen) + len(pick)))))
                chosen += pick
    else:
        chosen = torch.randperm(len(source), generator=g)[:n].sort().values.tolist()
        rows_of = None
    batch = _get(source, chosen, dev)
    _check_input(cfg.model, batch["x"], name)
    recon, pred, _ = reconstruct_batch(model, batch["x"], batch["y"], mask)
    if rows_of is not None:
        rows, titles = [r for _, r in rows_of], [str(k) for k, _ in rows_of]
    else:
        cols = min(16, len(chosen))
        rows = [list(range(i, min(i + cols, len(chosen)))) for i in range(0, len(chosen), cols)]
        titles = None
    wrong = int((pred != batch["y"]).sum())
    mse = float(((recon - batch["x"]) ** 2).mean())
    title = [f"capsctl reconstruct - {_describe(checkpoint, state)} - {name} {split}",
             f"top: input, bottom: reconstruction from the {mask} class capsule; y label, "
             f"p prediction; red: misclassified ({wrong} of {len(chosen)})"]
    image = reconstruction_figure(batch["x"], recon, batch["y"].cpu(), pred.cpu(), rows, titles,
                                  title, scale)
    written = _write(image, out, "reconstruct.png", checkpoint, tb, no_tb,
                     "inspect/reconstruct", state.get("step") or 0)
    return {**written, "examples": len(chosen), "misclassified": wrong, "mse": mse,
            "mask": mask, "dataset": name, "split": split, "size": tuple(image.shape[1:])}


def _run_segmentation(model, cfg, state, source, indices, n, g, dev, checkpoint, out, tb,
                      no_tb, split) -> dict:
    try:
        from capsctl.visualize_multimnist import segmentation_grid
    except ImportError:
        raise CapsctlError("MultiMNIST reconstructions need capsctl.visualize_multimnist, which "
                           "this capsctl does not have; use --dataset mnist") from None
    chosen = list(indices) if indices else torch.randperm(
        min(len(source), 100_000), generator=g)[:n].sort().values.tolist()
    batch = _get(source, chosen, dev)
    _check_input(cfg.model, batch["x"], "multimnist")
    image = segmentation_grid(model, batch, dev)
    written = _write(image, out, "reconstruct.png", checkpoint, tb, no_tb,
                     "inspect/segmentation", state.get("step") or 0)
    return {**written, "examples": len(chosen), "misclassified": None, "mse": None,
            "mask": "top-2 and labels", "dataset": "multimnist", "split": split,
            "size": tuple(image.shape[1:])}


def parse_digit(digit: str | None, num_classes: int) -> list[int] | None:
    if digit is None:
        return None
    if digit.strip().lower() == "all":
        return list(range(num_classes))
    try:
        k = int(digit)
    except ValueError:
        raise CapsctlError(f"--digit {digit!r}: expected a class 0..{num_classes - 1} or "
                           "'all'") from None
    if not 0 <= k < num_classes:
        raise CapsctlError(f"--digit {k}: expected a class 0..{num_classes - 1} or 'all'")
    return [k]


@torch.no_grad()
def run_perturb(checkpoint, index=None, digit=None, use_label=False, range_=0.25, step=0.05,
                dataset=None, split="test", out=None, tb=None, no_tb=False, device=None,
                data_root=None, scale=0) -> dict:
    """Figure 4: the chosen example(s) (``index``, or a confident example of ``digit``, or of
    every class by default), one D x K panel each, and the per-dimension change."""
    offsets = offsets_for(range_, step)
    if index is not None and digit is not None:
        raise CapsctlError("--index and --digit conflict: choose the example one way")
    model, cfg, state, dev = _load(checkpoint, device)
    require_decoder(model, "perturb")
    name = dataset or cfg.data.dataset
    source = _source(cfg, dataset, split, dev, data_root)
    _check_input(cfg.model, _get(source, [0], dev)["x"], name)
    if index is not None:
        _check_indices([index], len(source))
        chosen = [index]
    else:
        classes = parse_digit(digit or "all", cfg.model.num_classes)
        chosen = list(confident_examples(model, source, classes, dev).values())
    scale = scale or (3 if len(chosen) == 1 else 2)
    batch = _get(source, chosen, dev)
    x = batch["x"]
    _check_input(cfg.model, x, name)
    out_ = model(x)
    scores_BJ = out_["scores"].float()
    pred_B = scores_BJ.argmax(1)
    panels, rows = [], []
    for b, idx in enumerate(chosen):
        y, p = int(batch["y"][b]), int(pred_B[b])
        cls = y if use_label else p
        recon_DKN = perturbations(model, capsules(out_)[b], cls, offsets)
        change_D = dimension_change(recon_DKN).cpu()
        D, K = recon_DKN.shape[:2]
        verdict = "" if y == p else f"  (misclassified as {p})"
        length = "|v|" if "v" in out_ else "activation"
        lines = [f"{name} {split} #{idx}: label {y}{verdict}",
                 f"capsule {cls} ({'label' if use_label else 'predicted'}), {length} = "
                 f"{float(scores_BJ[b, cls]):.3f}",
                 "rows: dimensions d0.., with their mean |pixel change| x 1000"]
        panels.append(perturb_panel(recon_DKN.view(D, K, *x.shape[1:]).cpu(), offsets, change_D,
                                    x[b].cpu(), lines, scale))
        rows.append({"index": idx, "label": y, "prediction": p, "capsule": cls,
                     "length": float(scores_BJ[b, cls]), "change": change_D.tolist()})
    title = [f"capsctl perturb - {_describe(checkpoint, state)}",
             f"each row adds {offsets[0]:+.2f} .. {offsets[-1]:+.2f} (step {step:g}) to one "
             "dimension of the capsule; the framed column is the unperturbed reconstruction; "
             "the 3 dimensions that change it most are highlighted"]
    image = to_tensor(_titled(_stack(panels, columns=5), title))
    written = _write(image, out, "perturb.png", checkpoint, tb, no_tb, "inspect/perturb",
                     state.get("step") or 0)
    return {**written, "examples": rows, "offsets": offsets.tolist(),
            "size": tuple(image.shape[1:])}


@torch.no_grad()
def run_routes(checkpoint, index=None, digit=None, dataset=None, split="test", out=None,
               tb=None, no_tb=False, device=None, data_root=None, scale=3) -> dict:
    """Coupling coefficients after each routing pass and the agreement per class, for one
    example (``index``, default 0, or a confident example of ``digit``)."""
    if index is not None and digit is not None:
        raise CapsctlError("--index and --digit conflict: choose the example one way")
    model, cfg, state, dev = _load(checkpoint, device)
    T, H, W = require_routing(model)
    name = dataset or cfg.data.dataset
    source = _source(cfg, dataset, split, dev, data_root)
    _check_input(cfg.model, _get(source, [0], dev)["x"], name)
    if digit is not None:
        classes = parse_digit(digit, cfg.model.num_classes)
        if len(classes) != 1:
            raise CapsctlError("routes shows one example: --digit takes a single class")
        index = confident_examples(model, source, classes, dev)[classes[0]]
    index = 0 if index is None else index
    batch = _get(source, [index], dev)
    _check_input(cfg.model, batch["x"], name)
    maps = routing_maps(model, batch["x"])
    grid = maps["coupling_grid"][0].cpu()
    agree = maps["agreement_grid"][0].cpu() if "agreement_grid" in maps else None
    scores = maps["scores"][0].cpu()
    label, pred = int(batch["y"][0]), int(scores.argmax())
    R, J = grid.shape[:2]
    em = cfg.model.name == "em-capsnet"
    rows_named = ("assignment R, iteration", "R_ij") if em else ("coupling, pass", "c_ij")
    what = ("EM iterations; each map: the assignment probability R to that class" if em else
            "passes; each map: the coupling to that class")
    title = [f"capsctl routes - {_describe(checkpoint, state)} - {name} {split} #{index}",
             f"{T * H * W} children ({T} types on a {H}x{W} grid) route to {J} class capsules "
             f"in {R} {what} at each grid position",
             f"(mean of the {T} types) minus the uniform start 1/{J}"
             + ("; agreement: what routing adds to b_ij" if agree is not None else "")]
    image = routes_figure(batch["x"][0].cpu(), grid, agree, scores, label, title, scale,
                          maps["score_name"], rows_named)
    written = _write(image, out, "routes.png", checkpoint, tb, no_tb, "inspect/routes",
                     state.get("step") or 0)
    c = maps["coupling"][0].cpu()
    mass_RJ = c.mean(1)  # share of the children routed to each class, per pass
    result = {**written, "checkpoint": str(checkpoint), "dataset": name, "split": split,
              "index": index, "label": label, "prediction": pred, "score": maps["score_name"],
              "layout": {"types": T, "height": H, "width": W},
              "scores": _round(scores), "coupling_share": _round(mass_RJ),
              "coupling_grid": _round(grid), "coupling": _round(c),
              "size": list(image.shape[1:])}
    if "agreement" in maps:
        a = maps["agreement"][0].cpu()
        result["agreement_total"] = _round(a.sum(0))
        result["agreement_grid"] = _round(agree)
        result["agreement"] = _round(a)
    return result


def _round(t: torch.Tensor, digits: int = 5):
    """A tensor as nested lists of floats rounded for JSON (NaN/inf become None)."""
    def r(v):
        return round(v, digits) if math.isfinite(v) else None

    data = t.double().tolist()

    def walk(x):
        return [walk(e) for e in x] if isinstance(x, list) else r(x)

    return walk(data)
