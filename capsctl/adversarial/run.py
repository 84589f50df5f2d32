"""What ``capsctl attack`` and ``capsctl calibrate`` do, one library function each:
``attack_checkpoints`` (every checkpoint, every attack, the pictures) and
``calibrate_checkpoint`` (the detector's threshold, written into the checkpoint).

Shape legend: n images.
"""

from __future__ import annotations

from pathlib import Path

from capsctl.adversarial import DEFAULT_QUANTILE, METHODS
from capsctl.adversarial.attacks import Attack
from capsctl.adversarial.detector import DETECTOR_KEY, Detector, calibrate
from capsctl.errors import CapsctlError

MAX_STEPS = 10_000


def parse_eps(values: list[float]) -> tuple[list[float], str]:
    """eps in pixel units [0, 1] and the unit they were given in: all at most 1 -> pixels;
    any above 1 -> all in /255 (8 = 8/255)."""
    if not values:
        raise CapsctlError("--eps: give at least one value, e.g. --eps 0.05,0.1,0.2,0.3")
    if any(not (v >= 0) for v in values):      # NaN too
        raise CapsctlError(f"--eps {values}: expected numbers >= 0 (pixels in [0, 1], or "
                           "/255 units when above 1)")
    if any(v > 1 for v in values):
        if any(v > 255 for v in values):
            raise CapsctlError(f"--eps {values}: above 255/255 changes nothing more; pixels are "
                               "in [0, 1] (or /255 units when above 1)")
        return [v / 255 for v in values], "/255"
    return list(values), "pixels"


def attacks_of(methods: list[str], eps: list[float], steps: int, step_size: float | None,
               targeted: bool) -> list[Attack]:
    """Every method at every eps (one line for an unknown method or a bad number)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CapsctlError(f"--method {','.join(unknown) or '(none)'}: expected one or more of "
                           f"{', '.join(METHODS)}")
    if not 1 <= steps <= MAX_STEPS:
        raise CapsctlError(f"--steps {steps}: expected 1 to {MAX_STEPS}")
    if step_size is not None and not 0 < step_size <= 1:
        raise CapsctlError(f"--step-size {step_size}: expected a number in (0, 1] (pixels)")
    return [Attack(m, e, steps, step_size, targeted) for m in dict.fromkeys(methods)
            for e in eps]


def _checked(model, cfg, path) -> None:
    """One line unless ``model`` can be attacked here: one label per image, inputs in [0, 1]."""
    from capsctl import tasks
    from capsctl.data.registry import DATASETS, STANDARDISED

    if not tasks.get(DATASETS[cfg.data.name].task).one_label:
        raise CapsctlError(f"{path}: a {cfg.data.name} model sees two labels per image; "
                           "capsctl attack needs a one-label dataset")
    if DATASETS[cfg.data.name].normalisation == STANDARDISED:
        raise CapsctlError(f"{path}: {cfg.data.name} inputs are standardised per image, not "
                           "pixels in [0, 1]; capsctl attack works in pixel space")


def _detector(model, state, cfg, path, name, data_root, device, batch_size) -> tuple:
    """(the stored detector, or one computed now from the validation split, and where it came
    from); (None, why) without a decoder or a validation split."""
    from capsctl.evaluate import eval_source

    if not model.has_decoder:
        return None, "no decoder"
    stored = Detector.of(state)
    if stored is not None:
        return stored, "checkpoint"
    try:
        val = eval_source(name, "val", cfg, device, data_root, None)
    except CapsctlError:
        return None, "no validation split to set a threshold"
    return calibrate(model, val, name, "val", batch_size, device, cfg.train.precision), \
        "computed now (capsctl calibrate stores it)"


def attack_checkpoints(paths: list, methods: list[str], eps: list[float], steps: int = 10,
                       step_size: float | None = None, targeted: bool = False,
                       limit: int | None = 1000, dataset: str | None = None,
                       data_root: str | None = None, device_name: str | None = None,
                       batch_size: int | None = None, seed: int = 0, png: Path | None = None,
                       curve: Path | None = None, roc: Path | None = None,
                       progress_console=None) -> dict:
    """Attack every checkpoint on its own test set (or ``dataset``'s): {"eps_unit", "runs":
    [{"checkpoint", "name", "model", "dataset", "n", "clean_accuracy", "detector",
    "detector_source", "attacks": rows (measure.py)}], "pictures": {...}}."""
    from rich.markup import escape
    from rich.progress import Progress

    from capsctl.adversarial import figures
    from capsctl.adversarial.measure import collect, summarise
    from capsctl.checkpoint import load_model
    from capsctl.classes import class_names_of
    from capsctl.device import resolve
    from capsctl.evaluate import eval_source
    from capsctl.models.registry import class_loss_fn

    eps_px, unit = parse_eps(eps)
    attacks = attacks_of(methods, eps_px, steps, step_size, targeted)
    if limit is not None and limit < 1:
        raise CapsctlError(f"--limit {limit}: expected 1 or more (0: the whole test set)")
    device = resolve(device_name or "auto")
    runs, first = [], None
    for path in paths:
        model, cfg, state = load_model(path, device)
        _checked(model, cfg, path)
        name = dataset or cfg.data.name
        source = eval_source(name, "test", cfg, device, data_root, None)
        bs = batch_size or min(cfg.train.eval_batch_size, 250)
        detector, where = _detector(model, state, cfg, path, name, data_root, device, bs)
        total = len(source) if limit is None else min(limit, len(source))
        with Progress(console=progress_console, disable=progress_console is None,
                      transient=True) as bar:
            task = bar.add_task(escape(f"attacking {Path(str(path)).name}"), total=total)
            got = collect(model, class_loss_fn(cfg), source, attacks, bs, device,
                          cfg.train.precision, limit, seed,
                          progress=lambda n: bar.update(task, completed=n))
        rows = summarise(got, attacks, detector, roc=roc is not None)
        runs.append({"checkpoint": str(path), "name": _run_name(path), "model": cfg.model.name,
                     "dataset": name, "n": len(got.parts["y"]),
                     "clean_accuracy": float((got.parts["pred"] == got.parts["y"])
                                             .double().mean()),
                     "detector": detector.as_dict() if detector else None,
                     "detector_source": where, "attacks": rows})
        if first is None:
            first = (got, class_names_of(cfg, state, data_root))
    pictures = {}
    if png is not None:
        pictures["examples"] = str(figures.examples_png(first[0], attacks, first[1], png))
    if curve is not None:
        pictures["curve"] = str(figures.robustness_png(runs, curve, unit))
    if roc is not None:
        pictures["roc"] = str(figures.roc_png(runs, roc))
        for run in runs:
            for r in run["attacks"]:
                r.pop("roc", None)
    return {"eps_unit": unit, "seed": seed, "runs": runs, "pictures": pictures}


def _run_name(path) -> str:
    """A checkpoint's short name: its run folder's (runs/x/checkpoints/best.pt -> x), a
    pretrained model folder's, or a loose file's stem."""
    from capsctl.runfolder import RunFolder

    p = Path(str(path))
    folder = RunFolder.of_checkpoint(p).root
    return folder.name if p.is_dir() or folder != p.parent else p.stem


def calibrate_checkpoint(path, quantile: float = DEFAULT_QUANTILE, split: str = "val",
                         data_root: str | None = None, device_name: str | None = None,
                         batch_size: int | None = None, limit: int | None = None,
                         write: bool = True) -> dict:
    """The detector's threshold for the checkpoint at ``path`` (a file, or a run folder's
    best.pt) from its dataset's ``split``; with ``write`` stored in the checkpoint (rewritten
    atomically, everything else as it was). Returns the detector and the file."""
    from capsctl import checkpoint
    from capsctl.checkpoint import load_model
    from capsctl.device import resolve
    from capsctl.evaluate import eval_source

    if split not in ("val", "test"):
        raise CapsctlError(f"--split {split!r}: expected val (or test)")
    file = checkpoint.resolve_file(path)
    device = resolve(device_name or "auto")
    model, cfg, state = load_model(file, device)
    source = eval_source(cfg.data.name, split, cfg, device, data_root, None)
    bs = batch_size or cfg.train.eval_batch_size
    detector = calibrate(model, source, cfg.data.name, split, bs, device, cfg.train.precision,
                         quantile, limit)
    if write:
        checkpoint.add_entry(file, DETECTOR_KEY, detector.as_dict())
    return {"checkpoint": str(file), "written": write, "detector": detector.as_dict()}


