"""The training loop, top to bottom: build data and model, check what can be checked, lock the
run folder, (resume), run epochs of shuffled device-resident batches, validate after each
epoch, checkpoint, log, test the best model at the end. A resume continues at any of these
phases (a pending validation or test included) and ends as the uninterrupted run. The parts
live beside it: state.py (what a checkpoint holds), metrics.py, signals.py, rundir.py and
step.py (the step itself, shared with ``capsctl bench``). What differs between task kinds
(labels, what is correct, the picture) is asked of the data's Task (capsctl/tasks)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from capsctl import checkpoint, tasks
from capsctl.classes import dataset_class_names, numbered
from capsctl.config import Config, to_dict
from capsctl.confusion import log_confusion
from capsctl.data.build import MissingDataError, build, build_eval, check_eval
from capsctl.device import autocast, compile_model, use_channels_last
from capsctl.distributed import ONE_PROCESS, Group, agree, barrier, local_batch_size
from capsctl.errors import CapsctlError
from capsctl.measure import evaluate
from capsctl.models import build_model, count_parameters, loss_fn
from capsctl.tasks.base import Task
from capsctl.training.metrics import Metrics
from capsctl.runfolder import RunFolder
from capsctl.training.rundir import (RunLock, claim_run_dir, metrics_size, tidy_for_resume,
                                     write_config)
from capsctl.training.signals import Interrupted, SignalStop, agree_flags
from capsctl.training.state import TrainState, rng_state, set_rng_state
from capsctl.training.step import build_optimizer, lr_at, train_step
from capsctl.writers import Writers, for_run


def train(cfg: Config, run_dir: Path, device: torch.device, *, data_root: str | None = None,
          resume: bool = False, console: Console | None = None, show_progress: bool = True,
          force: bool = False, group: Group = ONE_PROCESS) -> dict:
    """Train into ``run_dir``: a new run creates the folder (``force``: moves an unlocked
    existing one aside) once data, model, the first batch and the final_eval datasets have
    passed their checks; ``resume`` continues from its checkpoints/last.pt (or starts again from
    its config.yaml when the run died before its first checkpoint), pending validation and test
    included. The process holds the folder's lock until it returns.

    Under torchrun (``group.enabled``) every rank runs this same loop on its slice of each global
    batch with a DDP-wrapped model; rank 0 alone writes files and prints. Returns the summary:
    steps, epochs, best validation and test accuracy, the best checkpoint, final_eval results.
    """
    r = None
    try:
        r = _prepare(cfg, RunFolder(run_dir), device, data_root, group,
                     console or Console(stderr=True))
        _open_run(r, resume, force)  # everything checked: the folder is locked (made) only now
        started = time.perf_counter()
        progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=r.console,
                            disable=not (show_progress and group.is_main), transient=False)
        r.model.train()
        with progress, SignalStop() as stop:
            while _validation_pending(r) or _more_to_train(r):
                if not _validation_pending(r):
                    _train_epoch(r, stop, progress)   # to the epoch's end or the last step
                _end_epoch(r, stop)
        return _test_best(r, started)
    finally:
        if r is not None and r.lock is not None:
            r.lock.release()


# --- setting up ---------------------------------------------------------------------------------

@dataclass
class _Run:
    """Everything one training run works with."""

    cfg: Config
    paths: RunFolder
    device: torch.device
    group: Group
    console: Console
    data_root: str | None
    data: object            # DataBundle: train stream, val / test sources, task kind
    task: Task              # the data's task: labels, what is correct, the picture
    local_batch: int        # this rank's share of train.batch_size
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    losses_of: Callable
    state: TrainState
    metrics: Metrics
    n_terms: int            # the loss terms the loss function returns
    final_sources: dict     # train.final_eval: dataset name -> evaluation source
    writers: Writers | None = None
    step_model: Callable | None = None   # the DDP-wrapped and/or compiled model
    lock: RunLock | None = None          # rank 0: the run folder's lock, held to the end
    last_save: float = 0.0               # time.monotonic() of the latest last.pt

    @property
    def main(self) -> bool:
        return self.group.is_main

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        total = t.epochs * self.data.train.steps_per_epoch
        return min(total, t.max_steps) if t.max_steps else total


def _agreed(fn: Callable, group: Group):
    """``fn()`` on rank 0 (its result there, None elsewhere); its one-line error on every
    rank."""
    held = []
    agree(lambda: held.append(fn()), group)
    return held[0] if held else None


def _prepare(cfg: Config, paths: RunFolder, device, data_root, group: Group,
             console: Console) -> _Run:
    """Data, model, optimizer, a fresh state, the final_eval sources; the first batch is run
    once (forward and backward) so a batch too big for memory fails now. Writes nothing."""
    t = cfg.train
    torch.manual_seed(t.seed)
    data = build(cfg, device, data_root)
    local_batch = local_batch_size(t.batch_size, group)  # the global batch split across ranks
    if data.train.steps_per_epoch == 0:
        raise CapsctlError(f"train.batch_size={t.batch_size} is larger than the training set "
                           f"({len(data.train.data)} images)")
    final_sources = _final_sources(cfg, device, data_root, console)
    model = build_model(cfg.model).to(device)
    if use_channels_last(device, t.precision):
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    task = tasks.get(data.task)
    losses_of = loss_fn(cfg, task.name)
    n_terms = _first_batch_fits(model, opt, data, losses_of, group, local_batch, cfg, device)
    metrics = Metrics(device, group)
    state = TrainState(model, opt, to_dict(cfg), metrics, device,
                       dataset_class_names(cfg, data_root))
    return _Run(cfg, paths, device, group, console, data_root, data, task, local_batch, model,
                opt, losses_of, state, metrics, n_terms, final_sources)


def _final_sources(cfg: Config, device, data_root, console: Console) -> dict:
    """``train.final_eval``'s test sources, built now so a wrong image size or a broken file
    stops the run before it starts; a dataset whose files are absent is skipped with a note."""
    sources = {}
    for name in cfg.train.final_eval:
        check_eval(name, cfg)
        try:
            sources[name] = build_eval(name, "test", cfg, device, data_root)
        except MissingDataError as e:
            console.print(f"[yellow]final eval on {name} skipped:[/] {escape(str(e))}",
                          highlight=False)
    return sources


def _first_batch_fits(model, opt, data, losses_of, group: Group, local_batch: int,
                      cfg: Config, device) -> int:
    """Run forward and backward on the first training batch, then undo it all (gradients
    dropped, buffers such as batch-norm statistics and the random generators restored): a
    batch that does not fit in memory is a one-line error before the run folder exists.
    Returns the number of loss terms."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = rng_state(device)   # dropout draws from it: the run must not see the probe
    try:
        batch = _rank_slice(data.train.batch(0, 0, 0), group, local_batch)
        model.train()
        with autocast(device, cfg.train.precision):
            out = model(batch["x"], tasks.get(data.task).model_labels(batch))
        losses = losses_of(out, batch, 0)
        losses["total"].backward()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        text = str(e)
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and not any(
                w in text for w in ("out of memory", "not enough memory", "can't allocate")):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise CapsctlError(f"a training batch of {local_batch} images does not fit in memory "
                           f"on {device} ({text.splitlines()[0][:120] if text else 'MemoryError'}"
                           "); lower train.batch_size") from None
    finally:
        opt.zero_grad(set_to_none=True)
        set_rng_state(rng, device)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return len(losses)


def _open_run(r: _Run, resume: bool, force: bool) -> None:
    """Load last.pt into the state (every field checked before anything is written), lock the
    run folder (rank 0; a new one is made now), then on rank 0 tidy or create the folder's
    files: config.yaml, writers; DDP and compile."""
    paths, state = r.paths, r.state
    restart = resume and not paths.last.is_file()   # died before its first checkpoint
    if resume and not restart:
        state.load_state_dict(checkpoint.load(paths.last, map_location=r.device),
                              r.data.train.steps_per_epoch, paths.last, r.main, r.n_terms)
    r.lock = _agreed(lambda: claim_run_dir(paths, resume, force), r.group)
    if r.main:
        if resume:
            tidy_for_resume(paths, 0 if restart else state.metrics_bytes)
        write_config(paths, r.cfg)
    barrier(r.group)
    r.writers = for_run(paths.root, 0 if restart else state.step + 1 if resume else None) \
        if r.main else Writers()
    r.step_model = _step_model(r.model, r.device, r.group, r.cfg.train.compile, r.console)
    r.last_save = time.monotonic()
    note = ("; no checkpoint yet: starting again from config.yaml" if restart
            else f"; resuming at step {state.step}" if resume else "")
    r.console.print(f"[bold]capsctl train[/] {r.cfg.model.name} "
                    f"({count_parameters(r.model):,} parameters) on {r.device}, "
                    f"{r.cfg.train.precision}; run folder {escape(str(paths.root))}{note}")


def _step_model(model, device, group: Group, compile_: bool, console: Console):
    """The model the steps call: DDP-wrapped under torchrun, torch.compile'd when asked (falls
    back to eager with one warning, also when the first compiled call fails)."""
    ddp = None
    if group.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)
    return compile_model(ddp or model, compile_,
                         lambda msg: console.print(f"[yellow]warning:[/] {escape(msg)}",
                                                   highlight=False))


def _rank_slice(batch: dict, group: Group, n: int) -> dict:
    """This rank's contiguous slice of ``n`` examples of the global batch (all of it in one
    process)."""
    if not group.enabled:
        return batch
    return {name: v[group.rank * n:(group.rank + 1) * n] for name, v in batch.items()}


def _target_reached(t, best_acc: float, has_val: bool) -> bool:
    """Early stopping: ``train.target_val_accuracy`` (0 = off) reached on validation."""
    return bool(t.target_val_accuracy) and has_val and best_acc >= t.target_val_accuracy


# --- during the run -----------------------------------------------------------------------------

def _validation_pending(r: _Run) -> bool:
    """Whether the position is an epoch's end or the run's last step not yet validated (a
    resume from a checkpoint written just before validation)."""
    s = r.state
    return s.val_step != s.step and (s.batch_in_epoch == r.data.train.steps_per_epoch
                                     or s.step >= r.total_steps)


def _more_to_train(r: _Run) -> bool:
    return r.state.step < r.total_steps and not _target_reached(
        r.cfg.train, r.state.best_val_accuracy, r.data.val is not None)


def _train_epoch(r: _Run, stop: SignalStop, progress: Progress) -> None:
    """Train from the current position to the epoch's end or the run's last step, writing
    last.pt every train.checkpoint_every steps / checkpoint_minutes and on a signal (then
    raises Interrupted)."""
    t, s, data = r.cfg.train, r.state, r.data
    steps_per_epoch, total_steps = data.train.steps_per_epoch, r.total_steps
    bar = progress.add_task("", total=steps_per_epoch, completed=s.batch_in_epoch,
                            epoch=f"{s.epoch + 1}/{t.epochs}", stats="")
    for k in range(s.batch_in_epoch, steps_per_epoch):
        if s.step >= total_steps:
            break
        batch = _rank_slice(data.train.batch(s.epoch, k, s.step), r.group, r.local_batch)
        lr = lr_at(r.cfg, s.step)
        losses, out, skipped = train_step(r.step_model, r.opt, batch, r.task, r.losses_of,
                                          lr, s.step, t.precision, r.device,
                                          t.nonfinite == "skip")
        r.metrics.add(losses, out["scores"], batch, r.task, s.step, skipped)
        s.step, s.batch_in_epoch = s.step + 1, k + 1
        progress.advance(bar)
        if s.step % t.log_every == 0 or s.step == total_steps:
            _log_train(r, lr, lambda stats: progress.update(bar, stats=stats))
        clock = bool(t.checkpoint_minutes
                     and time.monotonic() - r.last_save > 60 * t.checkpoint_minutes)
        by_time = agree_flags(stop, r.group, r.device, clock)
        if (stop.signum is not None or by_time
                or t.checkpoint_every and s.step % t.checkpoint_every == 0):
            _save_last(r)  # at the epoch's end or last step: validation pending
            _stop_if_signalled(r, stop)
    progress.remove_task(bar)


def _end_epoch(r: _Run, stop: SignalStop) -> None:
    """The pending validation of an epoch's end (or the run's last step), then last.pt; a
    signal that came meanwhile stops the run here."""
    s = r.state
    if s.batch_in_epoch == r.data.train.steps_per_epoch:  # else stopped by max_steps mid-epoch
        s.epoch, s.batch_in_epoch = s.epoch + 1, 0
    _validate(r)
    s.val_step = s.step
    _save_last(r)
    agree_flags(stop, r.group, r.device)
    _stop_if_signalled(r, stop)  # signalled during validation: last.pt is written


def _log_train(r: _Run, lr: float, show: Callable[[str], None]) -> None:
    """Log the interval's training row (after checking it was finite) and show it on the bar;
    a final partial interval stays in the metrics for last.pt."""
    r.metrics.check_finite(r.paths.last)
    step = r.state.step
    row = r.metrics.row(lr, r.state.epoch)
    if "train/skipped_nonfinite" in row:
        r.console.print(f"[yellow]warning:[/] skipped {row['train/skipped_nonfinite']} batch(es) "
                        f"with a non-finite loss before step {step}")
    r.writers.log(row, step)
    show(f"loss {row['train/loss_total']:.4f} acc {row['train/accuracy']:.4f} "
         f"{row['images_per_s']:.0f} img/s")
    if step % r.cfg.train.log_every == 0:
        r.metrics.clear()


def _save_last(r: _Run) -> None:
    """Write checkpoints/last.pt (rank 0; every rank takes part in reducing the metrics), unless
    a loss went non-finite: then stop and keep the last good one."""
    r.metrics.check_finite(r.paths.last)
    state = r.state.state_dict()
    if r.main:  # metrics.jsonl is flushed per row: its size marks what came before
        checkpoint.save(r.paths.last, {**state, "metrics_bytes": metrics_size(r.paths)})
    r.last_save = time.monotonic()


def _stop_if_signalled(r: _Run, stop: SignalStop) -> None:
    """Raise Interrupted when the ranks agreed on a signal (last.pt is written by then)."""
    if stop.signum is not None:
        r.writers.close()
        barrier(r.group)  # rank 0 has written last.pt before any rank exits
        raise Interrupted(stop.signum, r.paths.root, r.state.step)


def _validate(r: _Run) -> None:
    """The end of an epoch (or of the run): validate, keep the best as best.pt, log
    reconstructions, announce early stopping."""
    r.metrics.check_finite(r.paths.last)
    t, s, val = r.cfg.train, r.state, r.data.val
    if val is None:
        return
    m = evaluate(r.model, val, t.eval_batch_size, r.device, t.precision, r.losses_of,
                 step=s.step, group=r.group)
    r.writers.log({f"val/{name}": v for name, v in m.items() if name not in ("n", "correct")},
                  s.step)
    if m["accuracy"] > s.best_val_accuracy:
        s.best_val_accuracy, s.best_step = m["accuracy"], s.step
        if r.main:
            checkpoint.save(r.paths.best, s.state_dict(with_optimizer=False))
    r.console.print(f"epoch {s.epoch} (step {s.step}): val accuracy {m['accuracy']:.4%} "
                    f"(best {s.best_val_accuracy:.4%} at step {s.best_step})")
    if t.images_every_epoch and r.main:
        _log_reconstructions(r.model, val, r.task, r.writers, s.step, r.device,
                             t.precision)
    if _target_reached(t, s.best_val_accuracy, True):
        r.console.print(f"early stop: val accuracy reached train.target_val_accuracy="
                        f"{t.target_val_accuracy:.4%}")


@torch.no_grad()
def _log_reconstructions(model, source, task: Task, writers, step: int, device, precision: str,
                         n: int = 16) -> None:
    """The task's picture of the first ``n`` examples of ``source`` (one label: inputs above
    their reconstructions; pairs: the segmentation picture), when the model has a decoder."""
    if not model.has_decoder:
        return
    was = model.training
    model.eval()
    try:
        batch = source.get(torch.arange(min(n, len(source)), device=device))
        image = task.picture(model, batch, device, precision)
    finally:
        model.train(was)  # back to training mode on every path
    writers.image(task.picture_tag, image, step)


# --- the end ------------------------------------------------------------------------------------

def _test_best(r: _Run, started: float) -> dict:
    """Test the model picked on validation (never picked on test; the last one without
    validation) with per-class accuracy and the confusion picture, run train.final_eval, close
    the writers. Safe to redo: a resumed run that stopped here repeats it all. Returns the
    run's summary."""
    t, s = r.cfg.train, r.state
    if r.main and (r.data.val is None or not r.paths.best.exists()):
        checkpoint.save(r.paths.best, {**s.state_dict(with_optimizer=False), "batch_in_epoch": 0})
    barrier(r.group)
    r.model.load_state_dict(checkpoint.load(r.paths.best, map_location=r.device)["model"])
    m = evaluate(r.model, r.data.test, t.eval_batch_size, r.device, t.precision, group=r.group,
                 confusion=True)
    r.writers.log({"test/accuracy": m["accuracy"], "test/error": m["error"]}, s.step)
    if r.main:
        _confusion(r, m, s.class_names or numbered(r.cfg.model.num_classes))
    detector = _store_detector(r)
    final = _final_eval(r)
    r.writers.close()
    return {"run_dir": str(r.paths.root), "steps": s.step, "epochs": s.epoch,
            "best_val_accuracy": s.best_val_accuracy if r.data.val is not None else None,
            "best_step": s.best_step, "test_accuracy": m["accuracy"], "test_error": m["error"],
            "test_n": m["n"], "seconds": time.perf_counter() - started,
            "best_checkpoint": str(r.paths.best), "final_eval": final, "detector": detector}


def _store_detector(r: _Run) -> dict | None:
    """The reconstruction detector's threshold (capsctl/adversarial/detector.py: the 95th
    percentile of the validation images' reconstruction distances) added to best.pt; None for
    a model without a decoder, a two-label task, or fewer than MIN_IMAGES validation images."""
    from capsctl.adversarial.detector import calibrate_into

    val = r.data.val
    if not (r.model.has_decoder and val is not None and tasks.get(val.task).one_label):
        return None
    found = None
    if r.main:
        t = r.cfg.train
        found = calibrate_into(r.paths.best, r.model, val, r.cfg.data.name, t.eval_batch_size,
                               r.device, t.precision)
    if found is not None:
        r.console.print(f"detector: reconstruction distance above {found['threshold']:.4g} "
                        f"is unusual (95th percentile of {found['n']:,} validation images), "
                        "kept in best.pt", highlight=False)
    barrier(r.group)
    return found


def _confusion(r: _Run, m: dict, names: list[str]) -> None:
    """The test's confusion picture and per-class accuracies (``log_confusion``). A picture
    that cannot be drawn (a folder of 1,000 classes: 16,000 px square) is skipped with one
    warning, never the end of the run; the per-class accuracies are logged all the same."""
    try:
        log_confusion(r.writers, m, names, r.state.step)
    except CapsctlError as e:
        why = str(e).split("): ")[0] + (")" if "): " in str(e) else "")
        r.console.print(f"[yellow]warning:[/] the test confusion picture of {len(names):,} "
                        f"classes is not drawn ({escape(why)}); the per-class accuracies are in "
                        "metrics.jsonl", highlight=False, soft_wrap=True)
        r.writers.log({f"test/class_accuracy/{name}": acc
                       for name, acc in zip(names, m["per_class_accuracy"])
                       if acc is not None}, r.state.step)


def _final_eval(r: _Run) -> dict:
    """``train.final_eval``: each dataset's test accuracy of the best model, logged as
    test/<dataset>/accuracy (datasets whose files were absent at the start are left out).
    Returns {dataset: accuracy}."""
    t, results = r.cfg.train, {}
    for name, source in r.final_sources.items():
        m = evaluate(r.model, source, t.eval_batch_size, r.device, t.precision, group=r.group)
        r.writers.log({f"test/{name}/accuracy": m["accuracy"],
                       f"test/{name}/error": m["error"]}, r.state.step)
        r.console.print(f"final eval: {name} test accuracy {m['accuracy']:.4%} (n={m['n']:,})")
        results[name] = m["accuracy"]
    return results
