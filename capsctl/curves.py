"""``capsctl plot RUN...``: learning curves read from each run folder's metrics.jsonl - the
validation error (log scale) and the training loss (log scale) against epochs, several runs on
one chart with a legend. Torch-free (PIL draws the chart); works on a run still training (it
reads the rows written so far).

What metrics.jsonl holds (capsctl.training): a training row every ``train.log_every`` steps
(``step``, ``epoch`` - the 0-based epoch the step belongs to -, ``train/loss_total``, ...), a
``val/accuracy`` / ``val/error`` row at each epoch's end (at the step that ends it) and at the
run's last step, and ``test/accuracy`` / ``test/error`` once the run tested its best model.
The training loss drawn is ``train/loss_total`` unless another term is asked for
(``train/loss_margin``, ``train/loss_reconstruction``, ``train/loss_cross_entropy``, ...: the
terms the run's loss logs); the total of a run with a reconstruction term is not comparable to
one without, its margin term is.

Epochs on the x axis: a row at step ``s`` lies at ``s / steps_per_epoch``. The steps of an epoch
are not in the folder; they are the step of the first validation row (an epoch's end), checked
against the training rows' ``epoch`` (row at step s of epoch e: e < s / steps_per_epoch <= e + 1);
without a validation row they are bracketed by the training rows alone (a run stopped by
``train.max_steps`` inside its first epoch shows that validation at epoch 1). When some run's epoch
length cannot be told yet (a run in its first epoch without validation), every run is drawn
against steps instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capsctl.runfolder import RunFolder, finished
from capsctl.errors import CapsctlError

LOSS_KEY = "train/loss_total"
LOSS_PREFIX = "train/loss_"


@dataclass
class Curve:
    """One run's series; points are [epoch or None, step, value]."""

    run: str
    name: str
    steps_per_epoch: float | None = None
    val_error: list[list] = field(default_factory=list)
    train_loss: list[list] = field(default_factory=list)
    best_val_error: float | None = None
    best_val_epoch: float | None = None
    test_error: float | None = None
    finished: bool = False
    loss: str = "total"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _last_per_step(rows: list[dict], value) -> list[tuple[int, float]]:
    """(step, value) for the rows where ``value(row)`` is a number, one per step (the last
    written wins: a resumed run rewrites its tail), sorted by step."""
    by_step: dict[int, float] = {}
    for r in rows:
        v = value(r)
        if v is not None and r["step"] >= 0:
            by_step[r["step"]] = float(v)
    return sorted(by_step.items())


def _val_error(row: dict) -> float | None:
    if _number(row.get("val/error")):
        return row["val/error"]
    if _number(row.get("val/accuracy")):
        return 1.0 - row["val/accuracy"]
    return None


def steps_per_epoch(rows: list[dict]) -> float | None:
    """The steps of one epoch as far as the rows tell (see the module's docstring); None when
    they do not tell yet."""
    train = [(r["step"], r["epoch"]) for r in rows
             if _number(r.get(LOSS_KEY)) and isinstance(r.get("epoch"), int) and r["epoch"] >= 0
             and r["step"] > 0]
    low = max((s / (e + 1) for s, e in train), default=None)       # s <= (e + 1) * spe
    high = min((s / e for s, e in train if e > 0), default=None)   # s > e * spe
    val = [s for s, _ in _last_per_step(rows, _val_error) if s > 0]
    if val and (low is None or val[0] >= low - 1e-9) and (high is None or val[0] < high):
        return float(val[0])
    return low if high is not None else None


def loss_terms(rows: list[dict]) -> list[str]:
    """The loss terms the rows log (``train/loss_NAME`` -> NAME), in the order first seen."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.update({k[len(LOSS_PREFIX):]: None for k in r if k.startswith(LOSS_PREFIX)})
    return list(seen)


def read_curve(folder: Path, loss: str = "total") -> Curve:
    """One run's curves from ``folder``/metrics.jsonl, the training loss being the term
    ``loss`` (a one-line CapsctlError when it is not a run folder, has nothing to draw yet, or
    logs training rows without that term)."""
    folder, loss = Path(folder), loss.removeprefix(LOSS_PREFIX)
    if not folder.is_dir():
        raise CapsctlError(f"plot: {folder} is not a run folder (no such directory)")
    run = RunFolder(folder)
    if not run.metrics.is_file():
        raise CapsctlError(f"plot: {folder} holds no {run.METRICS}; is it a run folder?")
    rows = run.rows()
    curve = Curve(run=str(folder), name=folder.resolve().name or str(folder), loss=loss)
    terms, key = loss_terms(rows), LOSS_PREFIX + loss
    if terms and loss not in terms:
        raise CapsctlError(f"plot: {folder} logs no training loss {loss!r}; its terms: "
                           f"{', '.join(terms)} (--loss NAME)")
    spe = curve.steps_per_epoch = steps_per_epoch(rows)
    at = (lambda s: round(s / spe, 4)) if spe else (lambda s: None)
    curve.val_error = [[at(s), s, v] for s, v in _last_per_step(rows, _val_error)]
    curve.train_loss = [[at(s), s, v] for s, v in _last_per_step(
        rows, lambda r: r[key] if _number(r.get(key)) else None)]
    if curve.val_error:
        best = min(curve.val_error, key=lambda p: (p[2], p[1]))
        curve.best_val_error, curve.best_val_epoch = best[2], best[0]
    tests = _last_per_step(rows, lambda r: r["test/error"] if _number(r.get("test/error")) else (
        1.0 - r["test/accuracy"] if _number(r.get("test/accuracy")) else None))
    curve.test_error = tests[-1][1] if tests else None
    curve.finished = finished(rows)
    if not curve.val_error and not curve.train_loss:
        raise CapsctlError(f"plot: {run.metrics} has no training or validation rows "
                           "to draw yet")
    return curve


def curves(folders: list[Path], loss: str = "total") -> list[Curve]:
    """The curves of ``folders`` (training loss: the term ``loss``), in the order given."""
    if not folders:
        raise CapsctlError("plot: give at least one run folder")
    return [read_curve(Path(f), loss) for f in folders]


def x_unit(runs: list[Curve]) -> str:
    """"epoch" when every run's epoch length is known, else "step"."""
    return "epoch" if all(c.steps_per_epoch for c in runs) else "step"


def as_json(runs: list[Curve]) -> dict[str, Any]:
    """The JSON document of ``capsctl plot --json``: the x unit and every run's series."""
    return {"x": x_unit(runs), "point": ["epoch", "step", "value"],
            "runs": [asdict(c) for c in runs]}


# --- the chart ----------------------------------------------------------------------------------

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BG, INK, GRID, MINOR = (255, 255, 255), (20, 20, 20), (205, 205, 205), (236, 236, 236)
PLOT_W, PLOT_H, LEFT, TOP, GAP = 460, 300, 64, 44, 40
DECADES = 300                  # the log axes stay within 1e-300 .. 1e300


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def nice_step(span: float, most: int = 8) -> float:
    """A round tick spacing (1, 2 or 5 x 10^k) giving at most ``most`` intervals over ``span``."""
    if span <= 0:
        return 1.0
    raw = span / most
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def log_range(values: list[float]) -> tuple[float, float]:
    """(low, high) decades around the positive ``values`` (at least one decade)."""
    positive = [v for v in values if v > 0]
    if not positive:
        return 0.1, 1.0
    lo = max(math.floor(math.log10(min(positive))), -DECADES)   # 5e-324 would round to 0
    hi = min(max(math.ceil(math.log10(max(positive))), lo + 1), DECADES)
    return 10.0 ** lo, 10.0 ** hi


def log_ticks(low: float, high: float) -> list[tuple[float, bool]]:
    """(value, major) grid lines from ``low`` to ``high``: every decade is major; 2 and 5 times
    each decade are minor (labelled too when the range spans at most three decades)."""
    ticks, decade = [], low
    while decade <= high * 1.0001:
        ticks.append((decade, True))
        ticks += [(decade * m, False) for m in (2, 5) if decade * m < high]
        decade *= 10
    return ticks


def _pct(v: float) -> str:
    return f"{v * 100:.3g}%"


def _loss_label(v: float) -> str:
    return f"{v:.3g}"


def _panel(d, origin: tuple[int, int], title: str, unit: str, xmax: float,
           series: list[tuple[tuple, list[tuple[float, float]], bool]], label) -> None:
    """One log-scale panel at ``origin`` (its plot area's top-left corner): title, grid, axis
    labels, and each (colour, [(x, y)], dots) series."""
    x0, y0 = origin
    small, big = _font(11), _font(13)
    d.text((x0, y0 - 30), title, fill=INK, font=big)
    values = [y for _, pts, _ in series for _, y in pts]
    low, high = log_range(values)
    bottom = math.log10(low)
    span = math.log10(high) - bottom

    def ypix(v: float) -> float:
        return y0 + PLOT_H - (math.log10(min(max(v, low), high)) - bottom) / span * PLOT_H

    def xpix(x: float) -> float:
        return x0 + x / xmax * PLOT_W

    for v, major in log_ticks(low, high):
        y = ypix(v)
        d.line((x0, y, x0 + PLOT_W, y), fill=GRID if major else MINOR)
        if major or span <= 3:
            d.text((x0 - 6, y), label(v), fill=INK if major else (110, 110, 110), font=small,
                   anchor="rm")
    step = nice_step(xmax)
    k = 0
    while k * step <= xmax * 1.0001:
        x = xpix(k * step)
        d.line((x, y0, x, y0 + PLOT_H), fill=MINOR)
        d.text((x, y0 + PLOT_H + 6), f"{k * step:g}", fill=INK, font=small, anchor="ma")
        k += 1
    d.text((x0 + PLOT_W // 2, y0 + PLOT_H + 22), unit, fill=INK, font=small, anchor="ma")
    d.rectangle((x0, y0, x0 + PLOT_W, y0 + PLOT_H), outline=INK)
    for colour, pts, dots in series:
        xy = [(xpix(x), ypix(y)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        if dots or len(xy) == 1:
            for x, y in xy:
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def best_at(c: Curve, unit: str) -> float | None:
    """Where the best validation error was reached, in ``unit`` (epoch or step)."""
    if c.best_val_error is None:
        return None
    return c.best_val_epoch if unit == "epoch" else min(
        p[1] for p in c.val_error if p[2] == c.best_val_error)


def legend_line(c: Curve, unit: str) -> str:
    """The legend's words for one run: its name, best validation error (where), test error."""
    words = [c.name]
    if c.best_val_error is not None:
        words.append(f"best val {c.best_val_error:.2%} ({unit} {best_at(c, unit):g})")
    if c.test_error is not None:
        words.append(f"test {c.test_error:.2%}")
    if not c.finished:
        words.append("(in progress)")
    return "   ".join(words)


def write_png(runs: list[Curve], path: Path) -> Path:
    """The chart: validation error (left) and training loss (right), both log scale, against
    epochs (or steps), one colour per run, the legend under both. Returns ``path``."""
    from PIL import Image, ImageDraw

    unit = x_unit(runs)
    col = 0 if unit == "epoch" else 1
    xmax = max([p[col] for c in runs for p in c.val_error + c.train_loss] + [1e-9])
    xmax = math.ceil(xmax / nice_step(xmax)) * nice_step(xmax)
    legend_top = TOP + PLOT_H + 48
    width = 2 * (LEFT + PLOT_W) + GAP + 20
    height = legend_top + 18 * len(runs) + 14
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(runs))]
    val = [(k, [(p[col], p[2]) for p in c.val_error], True) for c, k in zip(runs, colours)]
    loss = [(k, [(p[col], p[2]) for p in c.train_loss], False) for c, k in zip(runs, colours)]
    _panel(d, (LEFT, TOP), "validation error (log scale)", unit, xmax, val, _pct)
    term = runs[0].loss               # one term for every run (``curves``)
    title = "training loss (log scale)" if term == "total" else \
        f"training loss: {term} (log scale)"
    _panel(d, (2 * LEFT + PLOT_W + GAP, TOP), title, unit, xmax, loss, _loss_label)
    for i, (c, k) in enumerate(zip(runs, colours)):
        y = legend_top + 18 * i
        d.line((LEFT, y + 6, LEFT + 24, y + 6), fill=k, width=3)
        d.text((LEFT + 32, y + 6), legend_line(c, unit), fill=INK, font=_font(12), anchor="lm")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
    except (OSError, ValueError) as e:
        raise CapsctlError(f"--out {path}: cannot write the chart ({e})") from None
    return path
