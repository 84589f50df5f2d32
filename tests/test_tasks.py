"""Task kinds (capsctl/tasks): the recipe "to add a task kind" of docs/architecture.md followed
literally - one file, here written into a temporary folder on the package's path - and the two
built-in kinds through the same interface."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from capsctl import tasks
from capsctl.data.registry import DATASETS
from capsctl.measure import evaluate
from capsctl.models.registry import MODELS

# the recipe's one file: a kind whose examples count as correct when the label is among the
# two highest scores, with its own metric (the top-1 accuracy beside it)
TOP2 = '''
import torch

from capsctl.tasks.base import Task


class Top2Task(Task):
    name = "top2"
    metrics = ("top1_accuracy",)

    def model_labels(self, batch):
        return batch["y"]

    def count_correct(self, scores_BJ, batch):
        return (scores_BJ.topk(2, dim=1).indices == batch["y"][:, None]).any(1).sum()

    def metric_sums(self, scores_BJ, batch):
        return {"top1_accuracy": (scores_BJ.argmax(1) == batch["y"]).sum()}


TASK = Top2Task()
'''


class Fixed(torch.nn.Module):
    """A "model" whose scores are given."""

    def __init__(self, scores_BJ):
        super().__init__()
        self.scores_BJ = scores_BJ

    def forward(self, x, y=None):
        return {"scores": self.scores_BJ[x[:, 0, 0, 0].long()]}


class Source:
    """An evaluation source of ``task`` over examples 0..n-1 (x holds the index)."""

    def __init__(self, task: str, y):
        self.task, self.y, self.default_limit = task, y, None

    def __len__(self):
        return len(self.y)

    def batches(self, batch_size, limit=None):
        for s in range(0, len(self), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(self)))
            yield {"x": idx.float().view(-1, 1, 1, 1), "y": self.y[idx]}


@pytest.fixture
def top2_kind(tmp_path, monkeypatch):
    (tmp_path / "top2.py").write_text(textwrap.dedent(TOP2))
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path)])
    tasks.get.cache_clear()
    yield
    tasks.get.cache_clear()
    sys.modules.pop("capsctl.tasks.top2", None)


def test_a_new_task_kind_is_one_file(top2_kind):
    assert "top2" in tasks.kinds()
    task = tasks.get("top2")
    scores = torch.tensor([[.9, .5, .1], [.2, .7, .6], [.1, .2, .9], [.8, .1, .3]])
    y = torch.tensor([0, 2, 1, 1])     # top-1 right: 0; in the top two: 0, 1, 2 (not 3)
    m = evaluate(Fixed(scores), Source("top2", y), 3, torch.device("cpu"))
    assert (m["correct"], m["n"], m["top1_accuracy"]) == (3, 4, 0.25)
    b = task.synthetic_batch((5, 1, 4, 4), 3, torch.Generator().manual_seed(0))
    assert set(b) == {"x", "y"} and b["x"].shape == (5, 1, 4, 4)
    assert torch.equal(task.targets(b, 3).sum(1), torch.ones(5, dtype=torch.long))


def test_the_built_in_kinds_are_the_datasets_and_the_losses():
    assert tasks.kinds() == (tasks.PAIR, tasks.SINGLE)
    assert {s.task for s in DATASETS.values()} == set(tasks.kinds())
    assert all(set(s.losses) <= set(tasks.kinds()) for s in MODELS.values())
    with pytest.raises(KeyError, match="unknown task kind 'triple'; the kinds are pair, single"):
        tasks.get("triple")


def test_the_two_kinds_through_one_interface():
    g = torch.Generator().manual_seed(0)
    single, pair = tasks.get(tasks.SINGLE), tasks.get(tasks.PAIR)
    b = pair.synthetic_batch((6, 1, 8, 8), 10, g)
    assert (b["y"] != b["y2"]).all() and b["x_a"].shape == b["x"].shape
    assert torch.equal(pair.model_labels(b), torch.stack([b["y"], b["y2"]], 1))
    assert torch.equal(single.model_labels(b), b["y"])
    assert torch.equal(pair.targets(b, 10).sum(1), torch.full((6,), 2))
    assert single.eval_labels(b, True) is None and pair.eval_labels(b, False) is None
    assert pair.eval_labels(b, True).shape == (6, 2)
    scores = torch.rand(6, 10, generator=g)
    assert set(pair.metric_sums(scores, b)) == set(pair.metrics) and single.metrics == ()
    assert single.one_label and not pair.one_label
