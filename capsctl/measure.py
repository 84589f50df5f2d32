"""evaluate(model, source) -> metrics: a model measured on an evaluation source, counts on the
device, one host sync at the end. The source's task (capsctl/tasks) says what the model is
given and what is correct, and adds its own metrics; one-label tasks can count a confusion
matrix. The trainer validates and tests with it; `capsctl eval` (evaluate.py) too.

Shape legend: B batch, J classes.
"""

from __future__ import annotations

import torch

from capsctl import tasks
from capsctl.confusion import confusion_counts, per_class_accuracy
from capsctl.device import autocast
from capsctl.distributed import ONE_PROCESS, Group, all_sum


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
             group: Group = ONE_PROCESS, confusion: bool = False) -> dict:
    """Accuracy (and mean loss terms when ``loss_fn`` is given) of ``model`` on ``source``.

    ``progress`` is an optional callable(n_done) for a progress bar. Under torchrun the batches
    are sharded across ranks and the counts summed, so every rank gets the one-process numbers.
    ``confusion`` (one-label tasks): also "confusion", the (J, J) list of counts (rows: true
    class, columns: prediction), and "per_class_accuracy", a list of J (None: no examples).
    The source's task (``tasks.get(source.task)``) says what is correct and adds its own
    metrics (a pair's: at least one right, the digits' overlap).
    """
    was_training = model.training
    model.eval()
    task = tasks.get(source.task)
    correct = torch.zeros((), dtype=torch.long, device=device)
    sums: dict[str, torch.Tensor] = {}
    task_sums: dict[str, torch.Tensor] = {}
    conf_JJ = None
    n = 0
    for batch in _batches(source, batch_size, limit, group, device):
        with autocast(device, precision):
            out = model(batch["x"], task.eval_labels(batch, loss_fn is not None))
        correct += task.count_correct(out["scores"], batch)
        for k, v in task.metric_sums(out["scores"], batch).items():
            task_sums[k] = task_sums.get(k, 0) + v.float()
        if confusion and task.one_label:
            counts = confusion_counts(out["scores"], batch["y"])
            conf_JJ = counts if conf_JJ is None else conf_JJ + counts
        b = batch["y"].shape[0]
        if loss_fn is not None:
            for k, v in loss_fn(out, batch, step).items():
                sums[k] = sums.get(k, 0) + v.detach().float() * b
        n += b
        if progress is not None:
            progress(n)
    model.train(was_training)
    return _read_metrics(correct, n, sums, task_sums, conf_JJ, group, device)


def _read_metrics(correct, n: int, sums: dict, task_sums: dict, conf_JJ, group: Group,
                  device) -> dict:
    """The device counts and sums as plain numbers: packed into one float64 tensor, summed over
    ranks under torchrun (counts, not averages of averages), read in one host sync."""
    names = sorted(sums) + sorted(task_sums)
    both = {**sums, **task_sums}
    parts = [correct.double().view(1), torch.tensor([float(n)], dtype=torch.float64,
                                                     device=device)]
    parts += [both[k].double().view(1) for k in names]
    if conf_JJ is not None:
        parts.append(conf_JJ.double().flatten())
    values = all_sum(torch.cat(parts), group).tolist()   # the one host sync
    c, n = int(values[0]), int(values[1])
    metrics = {"n": n, "correct": c, "accuracy": c / max(n, 1), "error": 1 - c / max(n, 1)}
    value_of = dict(zip(names, values[2:]))
    for k in sums:       # in the loss's order, then the task's own metrics
        metrics[f"loss_{k}"] = value_of[k] / max(n, 1)
    for k in task_sums:
        metrics[k] = value_of[k] / max(n, 1)
    if conf_JJ is not None:
        J = conf_JJ.shape[0]
        flat = [int(v) for v in values[2 + len(names):]]
        metrics["confusion"] = [flat[i * J:(i + 1) * J] for i in range(J)]
        metrics["per_class_accuracy"] = per_class_accuracy(metrics["confusion"])
    return metrics
