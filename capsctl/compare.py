"""``capsctl compare RUN...``: several runs side by side, read only from what each run folder
holds - config.yaml (the resolved config) and metrics.jsonl (the logged rows). Nothing is
re-evaluated; the parameter count is the configured model's, built on the meta device (no
memory, no weights read).

One row per run: the model family, its routing, parameters, training throughput (the median of
the logged ``images_per_s``), the best validation accuracy, the test accuracy on every dataset
the run was tested on (its own dataset: ``test/accuracy``; ``train.final_eval`` datasets:
``test/<dataset>/accuracy``), the steps, whether it finished (a ``test/accuracy`` row), and the
wall time from its first to its last row (the first logging interval estimated from its
throughput; pauses of an interrupted run count). Torch is imported only to count parameters.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capsctl.errors import CapsctlError
from capsctl.runfolder import MAX_TIME, RunFolder, Unreadable, finished, read_metrics  # noqa: F401

CONFIG_FILE, METRICS_FILE = RunFolder.CONFIG, RunFolder.METRICS
NO_ROUTING = {"cnn": "none", "multimnist-cnn": "none", "em-capsnet": "em",
              "efficient-capsnet": "self-attention"}


@dataclass
class RunRow:
    """What ``compare`` shows of one run; None where the folder does not tell."""

    run: str
    name: str
    model: str | None = None
    routing: str | None = None
    dataset: str | None = None
    parameters: int | None = None
    images_per_s: float | None = None
    best_val_accuracy: float | None = None
    test: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    finished: bool = False
    wall_s: float | None = None
    unreadable: str | None = None   # why the folder's files cannot be compared (a row still)


def _numbers(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def _wall(rows: list[dict], batch: int | None) -> float | None:
    """Seconds from the run's start to its last row: the span of the rows, plus the first
    logging interval estimated from its throughput."""
    timed = [r for r in rows if isinstance(r.get("time"), (int, float))]
    if not timed:
        return None
    span = float(timed[-1]["time"]) - float(timed[0]["time"])
    first = timed[0]
    rate = first.get("images_per_s")
    if batch and isinstance(rate, (int, float)) and rate > 0:
        span += first["step"] * batch / rate
    return span if 0 <= span < MAX_TIME else None   # a rate of 1e-300 images/s: unknown


def parameter_count(config: dict, source: str) -> int | None:
    """The parameters of the model ``config`` describes, built on the meta device; None when the
    config no longer loads (e.g. from an older capsctl)."""
    from capsctl import config as config_mod

    try:
        cfg = config_mod.from_dict(config, source=source)
    except CapsctlError:
        return None
    import torch

    from capsctl.models import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(cfg.model))


def routing_of(model: dict) -> str | None:
    """The routing a model section names: ``model.routing`` (capsnet), else the family's own."""
    name = model.get("name")
    if name == "capsnet":
        return str(_routing_name(model))
    return NO_ROUTING.get(name) if isinstance(name, str) else None


def _routing_name(model: dict):
    """``model.routing.name`` (capsctl writes config.yaml with it), or the name alone
    (``model.routing: dynamic``, format 2); a mapping without a name is returned as it is."""
    routing = model.get("routing", "dynamic")
    return routing.get("name", routing) if isinstance(routing, dict) else routing


def read_run(folder: Path, count_parameters: bool = True) -> RunRow:
    """One run's row from ``folder``/config.yaml and ``folder``/metrics.jsonl. A folder that is
    not a run folder is a CapsctlError; one whose files hold what capsctl never writes (a
    config section that is not a mapping, a name that is not a string, YAML that does not
    parse, Infinity or NaN in metrics.jsonl) is a row with ``unreadable`` saying why."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CapsctlError(f"compare: {folder} is not a run folder (no such directory)")
    run = RunFolder(folder)
    if not run.holds_a_run():
        raise CapsctlError(f"compare: {folder} holds neither {CONFIG_FILE} nor {METRICS_FILE}; "
                           "is it a run folder?")
    row = RunRow(run=str(folder), name=folder.name)
    try:
        _fill(row, folder, count_parameters)
    except CapsctlError as e:   # ConfigError of the YAML reader, Unreadable
        return RunRow(run=str(folder), name=folder.name,
                      unreadable=" ".join(str(e).replace(str(folder) + "/", "").split()))
    return row


def _fill(row: RunRow, folder: Path, count_parameters: bool) -> None:
    run = RunFolder(folder)
    config = read_config(run.config)
    model, data, train = (_section(config, s) for s in ("model", "data", "train"))
    for section, key, value in (("model", "name", model.get("name")),
                                ("model", "routing", _routing_name(model)),
                                ("data", "name", data.get("name"))):
        if value is not None and not isinstance(value, str):
            raise Unreadable(f"{CONFIG_FILE}: {section}.{key} is {str(value)[:40]}, not a name")
    row.model, row.routing = model.get("name"), routing_of(model)
    row.dataset = data.get("name")
    if count_parameters and config:
        row.parameters = parameter_count(config, str(run.config))
    rows = run.rows(strict=True)
    rates = _numbers(rows, "images_per_s")
    row.images_per_s = statistics.median(rates) if rates else None
    val = _numbers(rows, "val/accuracy")
    row.best_val_accuracy = max(val) if val else None
    row.steps = max((r["step"] for r in rows), default=None)
    row.finished = finished(rows)
    row.test = _tests(rows, row.dataset)
    batch = train.get("batch_size")
    row.wall_s = _wall(rows, batch if isinstance(batch, int) and batch > 0 else None)


def read_config(path: Path) -> dict:
    """config.yaml as a mapping ({} when absent); Unreadable when it is not a mapping."""
    if not path.is_file():
        return {}
    from capsctl.safe_yaml import read_yaml

    data = read_yaml(path)
    if not isinstance(data, dict):
        raise Unreadable(f"{CONFIG_FILE} is a {type(data).__name__}, not a mapping of sections")
    return data


def _section(config: dict, name: str) -> dict:
    """``config[name]`` ({} when absent); Unreadable when it is not a mapping."""
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Unreadable(f"{CONFIG_FILE}: section '{name}' is {str(value)[:40]!r}, not a "
                         "mapping of keys")
    return value


def _tests(rows: list[dict], dataset: str | None) -> dict[str, float]:
    """{dataset: test accuracy}: the run's own dataset from ``test/accuracy``, the others from
    ``test/<dataset>/accuracy``; the last logged value of each."""
    tests: dict[str, float] = {}
    for r in rows:
        for key, value in r.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key == "test/accuracy":
                tests[dataset or "test"] = float(value)
            elif key.startswith("test/") and key.endswith("/accuracy"):
                tests[key[len("test/"):-len("/accuracy")]] = float(value)
    return tests


def compare(folders: list[Path], count_parameters: bool = True) -> list[RunRow]:
    """The rows of ``folders``, in the order given."""
    if not folders:
        raise CapsctlError("compare: give at least one run folder")
    return [read_run(Path(f), count_parameters) for f in folders]


def datasets(rows: list[RunRow]) -> list[str]:
    """Every dataset any run was tested on, in first-seen order."""
    seen: list[str] = []
    for r in rows:
        seen += [d for d in r.test if d not in seen]
    return seen


def as_json(rows: list[RunRow]) -> dict[str, Any]:
    """The JSON document of ``capsctl compare --json``."""
    return {"datasets": datasets(rows), "runs": [asdict(r) for r in rows]}


# --- the bar chart ------------------------------------------------------------------------------

BAR_COLOURS = [(86, 156, 214), (255, 160, 60), (110, 200, 110), (220, 90, 90), (180, 130, 230),
               (200, 200, 90)]
CHART_BG, CHART_TEXT, CHART_GRID = (255, 255, 255), (20, 20, 20), (215, 215, 215)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def chart_floor(rows: list[RunRow]) -> float:
    """The accuracy at the chart's bottom: 0, or a round value below the lowest bar when all
    are high (so that differences between 0.98 and 0.99 show)."""
    values = [v for r in rows for v in r.test.values()]
    low = min(values, default=0.0)
    return 0.0 if low < 0.5 else max(0.0, int(low * 10 - 0.5) / 10)


def write_chart(rows: list[RunRow], path: Path) -> Path:
    """A PNG bar chart: one group per run, one bar per test dataset (accuracy), labelled with
    its value. Returns ``path``."""
    from PIL import Image, ImageDraw

    names = datasets(rows)
    if not names:
        raise CapsctlError("compare --png: none of the runs has a test accuracy to draw yet")
    floor = chart_floor(rows)
    bar, gap, left, top, plot_h = 26, 30, 60, 40, 300
    captions = [r.name if len(r.name) <= 24 else r.name[:23] + "~" for r in rows]
    widest = max(max(len(c), len(r.routing or "")) for c, r in zip(captions, rows))
    group = max(bar * len(names) + gap, 7 * widest + 16)
    width = left + group * len(rows) + 20 + 150
    height = top + plot_h + 90
    img = Image.new("RGB", (width, height), CHART_BG)
    d = ImageDraw.Draw(img)
    small, label = _font(11), _font(13)
    d.text((left, 10), f"test accuracy (axis from {floor:.0%})", fill=CHART_TEXT, font=label)
    y_of = lambda acc: top + plot_h - (acc - floor) / (1 - floor) * plot_h  # noqa: E731
    for k in range(6):
        acc = floor + (1 - floor) * k / 5
        y = y_of(acc)
        d.line((left - 4, y, left + group * len(rows), y), fill=CHART_GRID)
        d.text((left - 8, y), f"{acc:.0%}" if floor == 0 else f"{acc:.1%}", fill=CHART_TEXT,
               font=small, anchor="rm")
    for g, r in enumerate(rows):
        x0 = left + g * group + (group - bar * len(names)) // 2
        for b, name in enumerate(names):
            if name not in r.test:
                continue
            acc, x = r.test[name], x0 + b * bar
            d.rectangle((x, y_of(max(acc, floor)), x + bar - 3, top + plot_h),
                        fill=BAR_COLOURS[b % len(BAR_COLOURS)])
            d.text((x + bar // 2 - 1, y_of(max(acc, floor)) - 2), f"{acc * 100:.1f}",
                   fill=CHART_TEXT, font=small, anchor="md")
        mid = left + g * group + group // 2
        d.text((mid, top + plot_h + 8), captions[g], fill=CHART_TEXT, font=small, anchor="ma")
        d.text((mid, top + plot_h + 24), r.routing or "", fill=CHART_TEXT, font=small,
               anchor="ma")
    for b, name in enumerate(names):  # the legend
        y = top + 10 + 20 * b
        x = left + group * len(rows) + 20
        d.rectangle((x, y, x + 12, y + 12), fill=BAR_COLOURS[b % len(BAR_COLOURS)])
        d.text((x + 18, y + 6), name, fill=CHART_TEXT, font=small, anchor="lm")
    path = Path(path)
    img.save(path, format="PNG")
    return path


# --- the table ----------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def duration(s: float | None) -> str:
    if s is None or not 0 <= s < MAX_TIME:   # NaN and infinities too
        return "-"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def compare_table(rows: list[RunRow], title: str = "capsctl compare"):
    """A rich Table: one row per run, a test-accuracy column per dataset any run was tested
    on (its own dataset and train.final_eval ones); '-' where a run has no value."""
    from rich.markup import escape
    from rich.table import Table

    names = datasets(rows)
    table = Table(title=escape(title))
    for col in ("run", "model", "routing", "parameters", "train img/s", "best val"):
        table.add_column(col, justify="left" if col in ("run", "model", "routing") else "right")
    for d in names:
        table.add_column(escape(f"test {d}"), justify="right")
    table.add_column("steps", justify="right")
    table.add_column("wall", justify="right")
    notes = any(r.unreadable for r in rows)
    if notes:
        table.add_column("note")
    for r in rows:
        cells = [escape(r.name), escape(r.model or "-"), escape(r.routing or "-"),
                 "-" if r.parameters is None else f"{r.parameters:,}",
                 "-" if r.images_per_s is None else f"{r.images_per_s:,.1f}",
                 _pct(r.best_val_accuracy), *(_pct(r.test.get(d)) for d in names),
                 ("-" if r.steps is None else f"{r.steps:,}")
                 + ("" if r.finished or r.unreadable else " (unfinished)"),
                 duration(r.wall_s)]
        if notes:
            cells.append(escape(f"unreadable: {r.unreadable}") if r.unreadable else "")
        table.add_row(*cells)
    return table
