"""The real paper model on real MNIST: a few steps on a few hundred images must learn."""

from __future__ import annotations

import torch

from capsctl.config import from_dict
from capsctl.data.build import build
from capsctl.models import build_model, loss_fn


def test_paper_model_learns_real_mnist(mnist_root):
    torch.manual_seed(0)
    cfg = from_dict({"train": {"batch_size": 64}})   # the paper's model, loss and optimiser
    bundle = build(cfg, torch.device("cpu"), str(mnist_root))
    assert len(bundle.train.data) == 55_000 and len(bundle.val) == 5_000
    assert len(bundle.test) == 10_000
    model = build_model(cfg.model)
    losses_of = loss_fn(cfg, bundle.task)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    held = bundle.val.get(torch.arange(128))         # fixed real images, never trained on

    def held_loss():
        model.eval()
        with torch.no_grad():
            out = model(held["x"], held["y"])
            return losses_of(out, held)["total"].item(), \
                (out["scores"].argmax(1) == held["y"]).float().mean().item()

    before, acc_before = held_loss()
    model.train()
    for step in range(20):                           # 1,280 real training images
        batch = bundle.train.batch(0, step, step)
        out = model(batch["x"], batch["y"])
        loss = losses_of(out, batch)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, acc_after = held_loss()
    assert after < 0.7 * before, (before, after)
    assert acc_after > acc_before + 0.08, (acc_before, acc_after)   # ~0.16 -> ~0.28 here
