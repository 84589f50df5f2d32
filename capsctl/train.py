"""The training loop, top to bottom: build data and model, (resume), run epochs of shuffled
device-resident batches, validate after each epoch, checkpoint, log, test the best model at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from capsctl import checkpoint, data as data_mod, optim
from capsctl.config import Config, dump, to_dict
from capsctl.device import autocast, compile_model, use_channels_last
from capsctl.distributed import SINGLE, Group, all_max, all_sum, barrier, local_batch_size
from capsctl.errors import CapsctlError, CheckpointError, TrainingError
from capsctl.evaluate import count_correct, evaluate, model_labels
from capsctl.models import build_model, count_parameters, loss_fn as make_loss_fn
from capsctl.writers import Writers, for_run

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing last.pt."""

    def __init__(self, signum: int, run_dir: Path, step: int):
        self.signum, self.run_dir, self.step = signum, run_dir, step
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; last.pt "
                         f"written. Resume with: capsctl train --resume {run_dir}")


@dataclass
class RunPaths:
    root: Path

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"


RESUME_KEYS = ("optimizer", "step", "epoch", "batch_in_epoch", "best_val_accuracy",
               "best_step", "rng")


def check_run_dir(runs_root: Path, name: str, force: bool) -> Path:
    """The path of a new run folder; an existing one is an error unless ``force``."""
    run_dir = runs_root / name
    if run_dir.exists() and not force:
        raise CapsctlError(f"run folder {run_dir} already exists; continue it with --resume "
                           f"{run_dir}, pick another --name, or pass --force to move it aside")
    return run_dir


def _write_config(run_dir: Path, cfg: Config) -> None:
    """config.yaml, replaced atomically and only when it changes (resume with --set)."""
    path = run_dir / CONFIG_FILE
    text = "# resolved configuration of this run (capsctl)\n" + dump(cfg)
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        tmp = path.with_name(f".{CONFIG_FILE}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}; free space or fix "
                            "permissions") from None


def _trim_metrics(path: Path, size: int | None) -> None:
    """Cut metrics.jsonl back to its length when the resumed checkpoint was written: rows logged
    after it (and a line torn by a kill) are recomputed, so the file reads as one run."""
    if size is None or not path.is_file() or path.stat().st_size <= size:
        return
    with open(path, "r+b") as f:
        f.truncate(size)


def prepare_run_dir(runs_root: Path, name: str, force: bool) -> Path:
    """A new run folder. An existing one is an error, or with ``force`` is moved aside (never
    deleted) to ``NAME.replaced-YYYYmmdd-HHMMSS``."""
    run_dir = check_run_dir(runs_root, name, force)
    if run_dir.exists():
        aside = run_dir.with_name(f"{name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
        shutil.move(str(run_dir), str(aside))
    try:
        (run_dir / "checkpoints").mkdir(parents=True)
    except OSError as e:
        raise CapsctlError(f"cannot create run folder {run_dir}: {e.strerror or e}") from None
    return run_dir


def build_optimizer(model: torch.nn.Module, cfg: Config):
    """Adam with the config's settings; the fused kernel (one pass over each parameter), see
    capsctl/optim.py."""
    o = cfg.optim
    return optim.build(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                       weight_decay=o.weight_decay)


def lr_at(cfg: Config, step: int) -> float:
    """The authors' schedule: lr * decay^(step / decay_steps), smooth, floored at min_lr."""
    o = cfg.optim
    return max(o.lr * o.lr_decay ** (step / o.lr_decay_steps), o.min_lr)


class SignalStop:
    """First SIGINT/SIGTERM: remember it, let the current step finish. Second: exit at once
    (checkpoints are only ever replaced by atomic rename, so nothing is torn).

    Python runs a handler once for all the deliveries of a signal that come before it gets to
    run (two quick Ctrl-C while the main thread is inside one long C call), so the deliveries
    are counted on the wakeup fd, where the interpreter writes one byte per delivery."""

    def __init__(self):
        self.received = None   # the first signal this process itself received (handler)
        self.signum = None     # the signal the loop acts on: set by agree_flags() at step
        #                        boundaries, the max over ranks under torchrun
        self._old = {}
        self._wakeup = None    # (read socket, write socket, previous wakeup fd)

    def _deliveries(self, signum) -> int:
        """How many deliveries of ``signum`` this handler call stands for (at least one)."""
        n = 0
        if self._wakeup is not None:
            try:
                while data := self._wakeup[0].recv(4096):
                    n += data.count(signum)
            except OSError:  # drained (non-blocking read)
                pass
        return max(n, 1)

    def _handle(self, signum, frame):
        # the same signal twice exits at once; a SIGTERM after a SIGINT is what torchrun sends
        # its workers when Ctrl-C reached them all: let them finish and write the checkpoint
        if self._deliveries(signum) > 1 or (self.received is not None
                                            and signum == self.received):
            os._exit(128 + signum)
        self.received = self.received or signum

    def __enter__(self):
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        try:
            self._wakeup = (r, w, signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False))
        except ValueError:  # not in the main thread: count handler calls only
            r.close()
            w.close()
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
                # restart interrupted system calls (a collective's socket read under torchrun)
                # instead of failing them: the handler only sets a flag
                signal.siginterrupt(s, False)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc):
        if self.received is not None or self.signum is not None:  # stopping: a further signal
            # still means "exit at once" (a second one), or is ignored while we exit (torchrun)
            return
        for s, h in self._old.items():
            signal.signal(s, h)
        if self._wakeup is not None:
            r, w, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            r.close()
            w.close()
            self._wakeup = None


def _compiled(model, enabled: bool, console: Console):
    """torch.compile'd model; falls back to eager with one warning, also when the first compiled
    call fails (e.g. no C++ compiler)."""
    return compile_model(model, enabled,
                         lambda msg: console.print(f"[yellow]warning:[/] {msg}", highlight=False))


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(cfg: Config, run_dir: Path, device: torch.device, *, data_root: str | None = None,
          resume: bool = False, console: Console | None = None, show_progress: bool = True,
          force: bool = False, group: Group = SINGLE) -> dict:
    """Train into ``run_dir``: a new run creates the folder (``force``: moves an existing one
    aside) once data and model are built; ``resume`` continues from its checkpoints/last.pt.

    Under torchrun (``group.enabled``) every rank runs this same loop on its slice of each global
    batch with a DDP-wrapped model; rank 0 alone writes files and prints.
    """
    console = console or Console(stderr=True)
    main = group.is_main
    paths = RunPaths(run_dir)
    t = cfg.train
    skip_nonfinite = t.nonfinite == "skip"

    # --- data, model, optimizer -------------------------------------------------------------
    torch.manual_seed(t.seed)
    data = data_mod.build(cfg, device, data_root)
    local_batch = local_batch_size(t.batch_size, group)  # the global batch split across ranks
    for name in t.final_eval:  # unknown names or wrong image sizes fail now, not after training
        data_mod.check_eval(name, cfg)
    model = build_model(cfg.model).to(device)
    if use_channels_last(device, t.precision):
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    losses_of = make_loss_fn(cfg)
    steps_per_epoch = data.train.steps_per_epoch
    if steps_per_epoch == 0:
        raise CapsctlError(f"train.batch_size={t.batch_size} is larger than the training set "
                           f"({len(data.train.data)} images)")
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    # --- state: fresh or resumed ----------------------------------------------------------
    step, epoch, k_start, best_acc, best_step = 0, 0, 0, -1.0, -1
    accum: dict[str, torch.Tensor] = {}
    if resume:
        state = checkpoint.load(paths.last, map_location=device)
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{paths.last}: not a resumable checkpoint (no "
                                  f"{', '.join(missing)}; it holds weights only) - start a new "
                                  "run instead")
        invalid = [k for k in ("step", "epoch", "batch_in_epoch", "best_step")
                   if type(state[k]) is not int or state[k] < -1]
        if type(state["best_val_accuracy"]) not in (int, float):
            invalid.append("best_val_accuracy")
        if invalid or not 0 <= state["batch_in_epoch"] <= steps_per_epoch:
            raise CheckpointError(f"{paths.last}: corrupt training state "
                                  f"({', '.join(invalid) or 'batch_in_epoch'} out of range or "
                                  "of the wrong type)")
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"], device)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CapsctlError(f"{paths.last}: does not match the configured model "
                               f"({str(e).splitlines()[0][:160]})") from None
        step, epoch, k_start = state["step"], state["epoch"], state["batch_in_epoch"]
        best_acc, best_step = state["best_val_accuracy"], state["best_step"]
        # the stored accumulators are the sums over all ranks: rank 0 carries them on, the
        # others start from zero with the same keys (collectives need the same shapes)
        accum = {k: v.to(device) if main else (torch.full_like(v, -1) if k == "bad_step"
                                               else torch.zeros_like(v)).to(device)
                 for k, v in state.get("log_accum", {}).items()}
        if main:
            for tmp in paths.last.parent.glob(".*.pt.*.tmp"):  # left by a kill during a save
                tmp.unlink(missing_ok=True)
            _trim_metrics(run_dir / METRICS_FILE, state.get("metrics_bytes"))
    elif main and (force or not run_dir.exists()):  # created only now: bad input leaves none
        prepare_run_dir(run_dir.parent, run_dir.name, force)
    if main:
        _write_config(run_dir, cfg)
    barrier(group)
    writers = for_run(run_dir, resume_step=step if resume else None) if main else Writers()
    ddp = None
    if group.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)
    step_model = _compiled(ddp or model, t.compile, console)

    cfg_dict = to_dict(cfg)

    def state_dict(epoch_: int, k_: int, with_optimizer: bool = True) -> dict:
        s = {"model": model.state_dict(), "config": cfg_dict, "step": step, "epoch": epoch_,
             "batch_in_epoch": k_, "best_val_accuracy": best_acc, "best_step": best_step,
             "rng": _rng_state(device)}
        if with_optimizer:
            s["optimizer"] = opt.state_dict()
            s["log_accum"] = reduced(accum)
        return s

    def reduced(acc: dict) -> dict:
        """Copies of the accumulators summed over ranks (bad_step: the max)."""
        out = {k: v.detach().clone() for k, v in acc.items()}
        if group.enabled:
            for k, v in out.items():
                (all_max if k == "bad_step" else all_sum)(v, group)
        return out

    def check_finite() -> None:
        if group.enabled and "bad_step" in accum:
            accum.update({k: v for k, v in reduced(accum).items()
                          if k in ("bad_step", "bad_terms")})
        if "bad_step" in accum and int(accum["bad_step"]) >= 0:
            terms = ", ".join(f"{k}={v:.4g}" for k, v in
                              zip(term_names, accum["bad_terms"].tolist()))
            raise TrainingError(f"non-finite loss at step {int(accum['bad_step'])} ({terms}); "
                                f"stopped, the last good checkpoint {paths.last} is kept - "
                                "lower optim.lr or check the data")

    def save_last(epoch_: int, k_: int) -> None:
        check_finite()
        state = state_dict(epoch_, k_)  # every rank: the accumulators are reduced collectively
        if main:
            metrics = run_dir / METRICS_FILE  # flushed per row: its size marks what came before
            checkpoint.save(paths.last, {**state, "metrics_bytes": metrics.stat().st_size
                                         if metrics.is_file() else 0})

    def agree_flags(stop_: SignalStop, by_time: bool = False) -> bool:
        """Under torchrun a signal (or the checkpoint clock) on any rank counts on every rank:
        all stop, or all checkpoint, after the same step."""
        received = stop_.received  # read once: the handler may set it at any moment
        if group.enabled:  # every rank must take the same decision at the same step
            flags = all_max(torch.tensor([received or 0, int(by_time)], device=device),
                            group).tolist()
            received, by_time = flags[0] or None, bool(flags[1])
        stop_.signum = received
        return by_time

    term_names: list[str] = []
    console.print(f"[bold]capsctl train[/] {cfg.model.name} ({count_parameters(model):,} "
                  f"parameters) on {device}, {cfg.train.precision}; run folder {run_dir}"
                  + (f"; resuming at step {step}" if resume else ""))

    progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not (show_progress and main), transient=False)
    t_log, n_log = time.perf_counter(), 0
    last_ckpt_time = time.monotonic()
    val_metrics: dict = {}
    model.train()
    started = time.perf_counter()
    with progress, SignalStop() as stop:
        while (epoch < t.epochs and step < total_steps
               and not _target_reached(t, best_acc, data.val is not None)):
            task = progress.add_task("", total=steps_per_epoch, completed=k_start,
                                     epoch=f"{epoch + 1}/{t.epochs}", stats="")
            k_next = k_start
            for k in range(k_start, steps_per_epoch):
                if step >= total_steps:
                    break
                batch = data.train.batch(epoch, k, step)
                if group.enabled:  # this rank's contiguous slice of the global batch
                    lo = group.rank * local_batch
                    batch = {name: v[lo:lo + local_batch] for name, v in batch.items()}
                lr = lr_at(cfg, step)
                for param_group in opt.param_groups:
                    param_group["lr"] = lr
                with autocast(device, t.precision):
                    out = step_model(batch["x"], model_labels(batch))  # (B, 2) MultiMNIST
                losses = losses_of(out, batch, step)
                opt.zero_grad(set_to_none=True)
                # train.nonfinite=skip: a host sync per step, paid only when asked for
                skip = skip_nonfinite and not bool(torch.isfinite(losses["total"]))
                if not skip:
                    losses["total"].backward()
                    opt.step()
                step += 1
                k_next = k + 1
                progress.advance(task)

                # metrics stay on the device until the logging interval
                term_names = term_names or list(losses)
                terms = torch.stack([losses[n].detach().float() for n in term_names])
                if "sum" not in accum:
                    accum.update(sum=torch.zeros_like(terms), bad_terms=torch.zeros_like(terms),
                                 correct=torch.zeros((), device=device, dtype=torch.long),
                                 count=torch.zeros((), device=device, dtype=torch.long),
                                 steps=torch.zeros((), device=device, dtype=torch.long),
                                 skipped=torch.zeros((), device=device, dtype=torch.long),
                                 bad_step=torch.full((), -1, device=device, dtype=torch.long))
                if skip:
                    accum["skipped"] += 1
                else:
                    accum["sum"] += terms
                    accum["correct"] += count_correct(out["scores"].detach(), batch)  # exact pair
                    accum["count"] += batch["y"].shape[0]
                    accum["steps"] += 1
                    first_bad = (accum["bad_step"] < 0) & ~torch.isfinite(terms[-1])
                    accum["bad_step"] = torch.where(first_bad, step - 1, accum["bad_step"])
                    accum["bad_terms"] = torch.where(first_bad, terms, accum["bad_terms"])
                n_log += batch["y"].shape[0]

                if step % t.log_every == 0 or step == total_steps:
                    check_finite()
                    now = time.perf_counter()
                    ips = n_log * group.world / max(now - t_log, 1e-9)
                    acc = reduced(accum)
                    means = (acc["sum"] / acc["steps"].clamp(min=1)).tolist()
                    metrics = {f"train/loss_{n}": v for n, v in zip(term_names, means)}
                    metrics.update({"train/accuracy": int(acc["correct"])
                                    / max(int(acc["count"]), 1),
                                    "lr": lr, "images_per_s": ips, "epoch": epoch})
                    if int(acc.get("skipped", 0)):
                        n_skipped = metrics["train/skipped_nonfinite"] = int(acc["skipped"])
                        console.print(f"[yellow]warning:[/] skipped {n_skipped} batch(es) with "
                                      f"a non-finite loss before step {step}")
                    writers.log(metrics, step)
                    progress.update(task, stats=f"loss {metrics['train/loss_total']:.4f} "
                                    f"acc {metrics['train/accuracy']:.4f} {ips:.0f} img/s")
                    if step % t.log_every == 0:  # a final partial interval stays in last.pt
                        accum.clear()
                    t_log, n_log = now, 0
                by_steps = t.checkpoint_every and step % t.checkpoint_every == 0
                by_time = bool(t.checkpoint_minutes
                               and time.monotonic() - last_ckpt_time > 60 * t.checkpoint_minutes)
                by_time = agree_flags(stop, by_time)
                if stop.signum is not None or by_steps or by_time:
                    save_last(epoch, k_next)  # (epoch, steps_per_epoch) = validation pending
                    last_ckpt_time = time.monotonic()
                    if stop.signum is not None:
                        writers.close()
                        barrier(group)  # rank 0 has written last.pt before any rank exits
                        raise Interrupted(stop.signum, run_dir, step)
            progress.remove_task(task)
            if k_next == steps_per_epoch:
                epoch, k_start = epoch + 1, 0
            else:  # stopped by train.max_steps inside the epoch
                k_start = k_next

            # --- end of an epoch (or of the run): validate, keep the best, checkpoint ---------
            check_finite()
            if data.val is not None:
                val_metrics = evaluate(model, data.val, t.eval_batch_size, device, t.precision,
                                       losses_of, step=step, group=group)
                writers.log({f"val/{name}": v for name, v in val_metrics.items()
                             if name not in ("n", "correct")}, step)
                if val_metrics["accuracy"] > best_acc:
                    best_acc, best_step = val_metrics["accuracy"], step
                    if main:
                        checkpoint.save(paths.best, state_dict(epoch, k_start,
                                                               with_optimizer=False))
                console.print(f"epoch {epoch} (step {step}): val accuracy {val_metrics['accuracy']:.4%} "
                              f"(best {best_acc:.4%} at step {best_step})")
                if t.images_every_epoch and main:
                    _log_reconstructions(model, data.val, writers, step, device, t.precision)
                if _target_reached(t, best_acc, True):
                    console.print(f"early stop: val accuracy reached train.target_val_accuracy="
                                  f"{t.target_val_accuracy:.4%}")
            save_last(epoch, k_start)
            last_ckpt_time = time.monotonic()
            agree_flags(stop)
            if stop.signum is not None:  # signalled during validation: last.pt is written
                writers.close()
                barrier(group)
                raise Interrupted(stop.signum, run_dir, step)

    # --- test the model picked on validation (never picked on test) ---------------------------
    if main and (data.val is None or not paths.best.exists()):
        checkpoint.save(paths.best, state_dict(epoch, 0, with_optimizer=False))
    barrier(group)
    best_state = checkpoint.load(paths.best, map_location=device)
    model.load_state_dict(best_state["model"])
    test_metrics = evaluate(model, data.test, t.eval_batch_size, device, t.precision,
                            group=group)
    writers.log({"test/accuracy": test_metrics["accuracy"], "test/error": test_metrics["error"]},
                step)
    final = _final_eval(model, cfg, device, data_root, writers, step, console, group)
    writers.close()
    elapsed = time.perf_counter() - started
    return {"run_dir": str(run_dir), "steps": step, "epochs": epoch,
            "best_val_accuracy": best_acc if data.val is not None else None,
            "best_step": best_step, "test_accuracy": test_metrics["accuracy"],
            "test_error": test_metrics["error"], "test_n": test_metrics["n"],
            "seconds": elapsed, "best_checkpoint": str(paths.best), "final_eval": final}


def _target_reached(t, best_acc: float, has_val: bool) -> bool:
    """Early stopping: ``train.target_val_accuracy`` (0 = off) reached on validation."""
    return bool(t.target_val_accuracy) and has_val and best_acc >= t.target_val_accuracy


def _final_eval(model, cfg: Config, device, data_root, writers, step: int, console,
                group: Group = SINGLE) -> dict:
    """``train.final_eval``: each dataset's test accuracy of the best model, logged as
    test/<dataset>/accuracy; a dataset whose files are absent is skipped with a note."""
    results = {}
    for name in cfg.train.final_eval:
        try:
            source = data_mod.build_eval(name, "test", cfg, device, data_root)
        except data_mod.MissingDataError as e:
            console.print(f"[yellow]final eval on {name} skipped:[/] {escape(str(e))}",
                          highlight=False)
            continue
        m = evaluate(model, source, cfg.train.eval_batch_size, device, cfg.train.precision,
                     group=group)
        writers.log({f"test/{name}/accuracy": m["accuracy"], f"test/{name}/error": m["error"]},
                    step)
        console.print(f"final eval: {name} test accuracy {m['accuracy']:.4%} (n={m['n']:,})")
        results[name] = m["accuracy"]
    return results


@torch.no_grad()
def _log_reconstructions(model, source, writers, step, device, precision, n: int = 16) -> None:
    from capsctl.visualize import pair_grid

    was = model.training
    model.eval()
    try:
        batch = source.get(torch.arange(min(n, len(source)), device=device))
        if "y2" in batch and getattr(model, "decoder", None) is not None:  # MultiMNIST: Fig. 5
            from capsctl.visualize_multimnist import segmentation_grid

            writers.image("segmentation", segmentation_grid(model, batch, device), step)
            return
        with autocast(device, precision):
            out = model(batch["x"])
    finally:
        model.train(was)  # back to training mode on every path
    if "recon" in out:
        writers.image("reconstructions", pair_grid(batch["x"], out["recon"]), step)
