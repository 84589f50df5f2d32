"""Drawing primitives shared by every picture.

Every picture is drawn the same way: white digits on black, pixels upscaled by an integer factor
(nearest neighbour), a thin grey line between cells, labels in PIL's default font on a dark page,
mistakes framed and captioned in red. Images are float tensors (3, H, W) in [0, 1] (or PIL RGB
images while a figure is laid out); ``save_png`` writes them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from capsctl.errors import CapsctlError

PAGE = (22, 22, 22)        # background around the cells
LINE = (90, 90, 90)        # thin border between cells
TEXT = (225, 225, 225)
DIM_TEXT = (150, 150, 150)
BAD = (255, 70, 70)        # mistakes
MARK = (255, 196, 0)       # the unperturbed column, the predicted class, the strongest dimensions
# diverging colours: black at zero, the first colour at KNEE of the range, the second at its end
POS, NEG, KNEE = ((255, 150, 20), (255, 240, 170)), ((60, 130, 255), (190, 225, 255)), 0.55

MAX_SCALE = 16                 # --scale: 1 .. MAX_SCALE
MAX_PIXELS = 64_000_000        # no canvas larger than this (about 190 MB as RGB)


def check_scale(scale: int) -> int:
    """``scale`` if it is a whole number in 1..MAX_SCALE; else a one-line CapsctlError."""
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= MAX_SCALE:
        raise CapsctlError(f"--scale {scale}: expected a whole number from 1 to {MAX_SCALE}")
    return scale


def check_pixels(width: int, height: int) -> None:
    """Refuse a picture of more than MAX_PIXELS pixels, before anything of that size exists."""
    if width * height > MAX_PIXELS:
        raise CapsctlError(f"the picture would be {width:,} x {height:,} px "
                           f"({width * height / 1e6:.0f} megapixels; at most "
                           f"{MAX_PIXELS // 1_000_000}): use a smaller --scale or fewer "
                           "examples/columns")


def canvas(width: int, height: int, colour=PAGE) -> Image.Image:
    """A new RGB page of ``colour`` (size checked against MAX_PIXELS)."""
    check_pixels(width, height)
    return Image.new("RGB", (width, height), colour)


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
    """A PIL image -> (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def save_png(image_3HW: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) float image in [0, 1] as a PNG (folders created); returns the path."""
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


def frame(draw: ImageDraw.ImageDraw, box, colour, width: int = 2) -> None:
    """An outline just inside ``box`` (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=width)


def text(draw, xy, words, size=12, fill=TEXT, anchor="la") -> None:
    """``words`` at ``xy`` in the default font at ``size`` px."""
    draw.text(xy, words, fill=fill, font=font(size), anchor=anchor)


def stack_size(sizes: list[tuple[int, int]], columns: int, gap: int = 12) -> tuple[int, int]:
    """(width, height) of ``stack`` of panels of these (width, height) sizes."""
    rows = [sizes[i:i + columns] for i in range(0, len(sizes), columns)]
    width = max(sum(w for w, _ in r) + gap * (len(r) + 1) for r in rows)
    height = sum(max(h for _, h in r) for r in rows) + gap * (len(rows) + 1)
    return width, height


def stack(images: list[Image.Image], columns: int, gap: int = 12) -> Image.Image:
    """Panels (any sizes) left to right in rows of ``columns``, on the page colour."""
    page = canvas(*stack_size([im.size for im in images], columns, gap))
    y = gap
    for i in range(0, len(images), columns):
        row, x = images[i:i + columns], gap
        for im in row:
            page.paste(im, (x, y))
            x += im.width + gap
        y += max(im.height for im in row) + gap
    return page


def titled(body: Image.Image, lines: list[str], size: int = 13, pad: int = 8) -> Image.Image:
    """``body`` under a few lines of text (the first bright, the rest dim)."""
    line_h = size + 5
    width = max(body.width + 2 * pad, max((int(font(size).getlength(t)) for t in lines),
                                          default=0) + 2 * pad)
    page = canvas(width, body.height + len(lines) * line_h + 2 * pad)
    draw = ImageDraw.Draw(page)
    for k, t in enumerate(lines):
        text(draw, (pad, pad + k * line_h), t, size, TEXT if k == 0 else DIM_TEXT)
    page.paste(body, (pad, pad + len(lines) * line_h))
    return page


def legend(draw, page, x: int, y: int, bars) -> None:
    """Diverging colour bars from (``x``, ``y``): (name, low value, high value, note) each."""
    bar_w, bar_h, f = 140, 10, font(11)
    for name, lo, hi, note in bars:
        mid = y + bar_h // 2
        ramp = diverging(torch.linspace(-1, 1, bar_w).view(1, -1), 1.0)
        for words, gap in ((name, 10), (f"{lo:.3g}", 4)):
            text(draw, (x, mid), words, 11, DIM_TEXT, "lm")
            x += int(f.getlength(words)) + gap
        page.paste(tile(ramp, 1).resize((bar_w, bar_h), Image.NEAREST), (x, y))
        x += bar_w + 4
        for words, gap in ((f"{hi:.3g}", 6), (note, 30)):
            text(draw, (x, mid), words, 11, DIM_TEXT, "lm")
            x += int(f.getlength(words)) + gap
