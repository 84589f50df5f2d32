"""evaluate(model, source) -> metrics: counts on the device, one host sync at the end."""

from __future__ import annotations

import torch

from pathlib import Path

from capsctl.device import autocast
from capsctl.distributed import SINGLE, Group, all_sum


PAIR_METRICS = ("at_least_one_accuracy", "bbox_overlap_of_smaller", "bbox_overlap_iou")


def model_labels(batch: dict) -> torch.Tensor:
    """The labels to hand the model: (B,) ``y``, or (B, 2) ``[y, y2]`` for two-digit batches
    (each digit then gets its own reconstruction)."""
    return torch.stack([batch["y"], batch["y2"]], 1) if "y2" in batch else batch["y"]


def pair_hits(scores_BJ: torch.Tensor, y_B: torch.Tensor, y2_B: torch.Tensor):
    """MultiMNIST scoring, (B,) bools each: ``exact`` when the two highest scores (longest
    capsules) are exactly the two labels (the paper's metric), ``at_least_one`` when one of them
    is a label."""
    top2_B2 = scores_BJ.topk(2, dim=1).indices
    hit_B2 = (top2_B2 == y_B[:, None]) | (top2_B2 == y2_B[:, None])
    return hit_B2.all(1), hit_B2.any(1)


def count_correct(scores_BJ: torch.Tensor, batch: dict) -> torch.Tensor:
    """Correct examples in a batch (a device scalar): top-1 = y, or exact pair with ``y2``."""
    if "y2" in batch:
        return pair_hits(scores_BJ, batch["y"], batch["y2"])[0].sum()
    return (scores_BJ.argmax(dim=1) == batch["y"]).sum()


def _batches(source, batch_size: int, limit: int | None, group: Group, device: torch.device):
    """The source's batches; under torchrun each rank takes every world-th batch."""
    if not group.enabled:
        yield from source.batches(batch_size, limit)
        return
    n = len(source) if limit is None else min(limit, len(source))
    for start in range(group.rank * batch_size, n, group.world * batch_size):
        yield source.get(torch.arange(start, min(start + batch_size, n), device=device))


@torch.no_grad()
def evaluate(model, source, batch_size: int, device: torch.device, precision: str = "fp32",
             loss_fn=None, limit: int | None = None, progress=None, step: int = 0,
             group: Group = SINGLE) -> dict:
    """Accuracy (and mean loss terms when ``loss_fn`` is given) of ``model`` on ``source``.

    ``progress`` is an optional callable(n_done) for a progress bar. Under torchrun the batches
    are sharded across ranks and the counts summed, so every rank gets the one-process numbers.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    sums: dict[str, torch.Tensor] = {}
    pair_sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in _batches(source, batch_size, limit, group, device):
        two = "y2" in batch  # MultiMNIST: score by exact pair; the loss decodes each true digit
        with autocast(device, precision):
            out = model(batch["x"], model_labels(batch) if two and loss_fn else None)
        correct += count_correct(out["scores"], batch)
        if two:
            _add_pair_sums(pair_sums, out["scores"], batch)
        b = batch["y"].shape[0]
        if loss_fn is not None:
            for k, v in loss_fn(out, batch, step).items():
                sums[k] = sums.get(k, 0) + v.detach().float() * b
        n += b
        if progress is not None:
            progress(n)
    model.train(was_training)
    if group.enabled:  # counts, not averages of averages
        names = sorted(sums) + sorted(pair_sums)
        packed = torch.stack([correct.double(), torch.tensor(float(n), device=device).double()]
                             + [{**sums, **pair_sums}[k].double() for k in names])
        all_sum(packed, group)
        correct, n = packed[0].long(), int(packed[1].item())
        for i, k in enumerate(names):
            (sums if k in sums else pair_sums)[k] = packed[2 + i]
    c = int(correct.item())
    metrics = {"n": n, "correct": c, "accuracy": c / max(n, 1), "error": 1 - c / max(n, 1)}
    for k, v in sums.items():
        metrics[f"loss_{k}"] = float(v.item()) / max(n, 1)
    for k, v in pair_sums.items():
        metrics[k] = float(v.item()) / max(n, 1)
    return metrics


def _add_pair_sums(sums: dict, scores_BJ: torch.Tensor, batch: dict) -> None:
    """Two-digit extras (summed on the device): at-least-one-correct and the bounding-box
    overlap of the pairs seen."""
    from capsctl.data.multimnist import bbox_overlap

    one_B = pair_hits(scores_BJ, batch["y"], batch["y2"])[1]
    extras = {"at_least_one_accuracy": one_B.sum()}
    if "x_a" in batch:
        for k, v in bbox_overlap(batch["x_a"], batch["x_b"]).items():
            extras[f"bbox_overlap_{k}"] = v.sum()
    for k, v in extras.items():
        sums[k] = sums.get(k, 0) + v.float()


def evaluate_checkpoints(paths, datasets, split: str, device_name: str | None,
                         batch_size: int | None, limit: int | None, data_root: str | None,
                         progress_console=None, group: Group = SINGLE) -> list[dict]:
    """Evaluate every checkpoint on every dataset (default: the one it was trained on)."""
    from rich.progress import Progress

    from capsctl import data as data_mod
    from capsctl.checkpoint import load_model
    from capsctl.device import resolve

    results = []
    device = resolve(device_name or "auto")
    for path in paths:
        model, cfg, state = load_model(path, device)
        for name in datasets or [cfg.data.dataset]:
            source = data_mod.build_eval(name, split, cfg, device, data_root)
            # a streamed source (MultiMNIST: 10M) evaluates a default prefix unless told
            n_max = limit if limit is not None else getattr(source, "default_limit", None)
            total = len(source) if n_max is None else min(n_max, len(source))
            bs = batch_size or cfg.train.eval_batch_size
            with Progress(console=progress_console, disable=progress_console is None,
                          transient=True) as bar:
                task = bar.add_task(f"{Path(str(path)).name} on {name}", total=total)
                m = evaluate(model, source, bs, device, cfg.train.precision, limit=n_max,
                             progress=lambda n: bar.update(task, completed=n), group=group)
            results.append({"checkpoint": str(path), "dataset": name, "split": split,
                            "n": m["n"], "correct": m["correct"], "accuracy": m["accuracy"],
                            "error": m["error"], "model": cfg.model.name,
                            "step": state.get("step"),
                            **{k: m[k] for k in PAIR_METRICS if k in m}})
    return results
