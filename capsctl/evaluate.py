"""evaluate(model, source) -> metrics: counts on the device, one host sync at the end."""

from __future__ import annotations

import torch

from pathlib import Path

from capsctl.device import autocast


@torch.no_grad()
def evaluate(model, source, batch_size: int, device: torch.device, precision: str = "fp32",
             loss_fn=None, limit: int | None = None, progress=None, step: int = 0) -> dict:
    """Accuracy (and mean loss terms when ``loss_fn`` is given) of ``model`` on ``source``.

    ``progress`` is an optional callable(n_done) for a progress bar.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in source.batches(batch_size, limit):
        with autocast(device, precision):
            out = model(batch["x"])
        pred = out["scores"].argmax(dim=1)
        correct += (pred == batch["y"]).sum()
        b = batch["y"].shape[0]
        if loss_fn is not None:
            for k, v in loss_fn(out, batch, step).items():
                sums[k] = sums.get(k, 0) + v.detach().float() * b
        n += b
        if progress is not None:
            progress(n)
    model.train(was_training)
    c = int(correct.item())
    metrics = {"n": n, "correct": c, "accuracy": c / max(n, 1), "error": 1 - c / max(n, 1)}
    for k, v in sums.items():
        metrics[f"loss_{k}"] = float(v.item()) / max(n, 1)
    return metrics


def evaluate_checkpoints(paths, datasets, split: str, device_name: str | None,
                         batch_size: int | None, limit: int | None, data_root: str | None,
                         progress_console=None) -> list[dict]:
    """Evaluate every checkpoint on every dataset (default: the one it was trained on)."""
    from rich.progress import Progress

    from capsctl import data as data_mod
    from capsctl.checkpoint import load_model
    from capsctl.device import resolve

    results = []
    for path in paths:
        device = resolve(device_name or "auto")
        model, cfg, state = load_model(path, device)
        for name in datasets or [cfg.data.dataset]:
            source = data_mod.build_eval(name, split, cfg, device, data_root)
            total = len(source) if limit is None else min(limit, len(source))
            bs = batch_size or cfg.train.eval_batch_size
            with Progress(console=progress_console, disable=progress_console is None,
                          transient=True) as bar:
                task = bar.add_task(f"{Path(str(path)).name} on {name}", total=total)
                m = evaluate(model, source, bs, device, cfg.train.precision, limit=limit,
                             progress=lambda n: bar.update(task, completed=n))
            results.append({"checkpoint": str(path), "dataset": name, "split": split,
                            "n": m["n"], "correct": m["correct"], "accuracy": m["accuracy"],
                            "error": m["error"], "model": cfg.model.name,
                            "step": state.get("step")})
    return results
