"""Adam for the trainer: torch's fused Adam kernel behind a small optimizer class.

Why not ``torch.optim.Adam(fused=True)``? It runs the very same kernel, but constructing any
``torch.optim`` optimizer imports ``torch._dynamo`` (``add_param_group`` is wrapped to disable
it), which costs about 150 MB of resident memory and 1.5 s of start-up on a CPU, a sixth of the
paper model's whole training footprint at batch 100. This class calls the kernel,
``torch._fused_adam_``, directly and keeps torch.optim's ``state_dict`` format, so checkpoints
move freely between the two (a checkpoint written by either resumes in the other, bit for bit).

``torch._fused_adam_`` is private: a torch release may drop it or change its signature. So
``build`` probes it once per process (one Adam step on a one-element tensor, made by the very
call ``FusedAdam.step`` makes, checked against Adam's closed-form first step) and returns
``torch.optim.Adam(fused=True)`` - the same kernel behind torch's public API, the same numbers,
the same state_dict - when the probe fails or ``CAPSCTL_FUSED_ADAM=0``.
"""

from __future__ import annotations

import os

import torch

ENV_SWITCH = "CAPSCTL_FUSED_ADAM"  # "0": always torch.optim.Adam(fused=True)

# the defaults torch.optim.Adam writes into every param group (kept for state_dict interchange)
_GROUP_FLAGS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                "differentiable": False, "fused": True, "decoupled_weight_decay": False}


class FusedAdam:
    """Adam (Kingma & Ba) with torch's fused multi-tensor kernel; L2 ``weight_decay`` as
    torch.optim.Adam. Supports what the trainer uses: ``param_groups`` (lr is read each step),
    ``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        params = list(params)
        if not params:
            raise ValueError("FusedAdam got an empty parameter list")
        self.param_groups = [{"params": params, "lr": lr, "betas": tuple(betas), "eps": eps,
                              "weight_decay": weight_decay, **_GROUP_FLAGS}]
        self.state: dict[torch.Tensor, dict] = {}
        # the moments are allocated now, before any activation: long-lived blocks at the bottom
        # of the heap keep the per-step temporaries from fragmenting it (a lower peak RSS)
        for p in params:
            self._state(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def _state(self, p: torch.Tensor) -> dict:
        s = self.state.get(p)
        if s is None:  # as torch.optim.Adam(fused=True) initialises it
            s = self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return s

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_kind: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            beta1, beta2 = group["betas"]
            for ps in by_kind.values():
                states = [self._state(p) for p in ps]
                _fused_step(ps, [p.grad for p in ps], [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                            group["lr"], beta1, beta2, group["weight_decay"], group["eps"])

    def state_dict(self) -> dict:
        """torch.optim's layout: parameters numbered in group order."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(g)
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(own["params"])
                for g, own in zip(groups, self.param_groups)):
            raise ValueError("optimizer state does not match the model's parameters")
        self.state = {}
        for g, own in zip(groups, self.param_groups):
            for k, v in g.items():
                if k != "params":
                    own[k] = tuple(v) if k == "betas" else v
            for idx, p in zip(g["params"], own["params"]):
                s = sd["state"].get(idx)
                if s is None:
                    continue
                if s["exp_avg"].shape != p.shape:
                    raise ValueError(f"optimizer state {idx}: shape {tuple(s['exp_avg'].shape)}"
                                     f" does not match the parameter's {tuple(p.shape)}")
                self.state[p] = {
                    "step": s["step"].to(device=p.device, dtype=torch.float32),
                    "exp_avg": s["exp_avg"].to(device=p.device, dtype=p.dtype),
                    "exp_avg_sq": s["exp_avg_sq"].to(device=p.device, dtype=p.dtype)}


def _fused_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr: float, beta1: float,
                beta2: float, weight_decay: float, eps: float) -> None:
    """One Adam step in place on lists of same-device, same-dtype tensors: steps += 1, then
    torch's fused kernel, called as torch.optim.Adam(fused=True) calls it."""
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr,
                       beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                       maximize=False, grad_scale=None, found_inf=None)


_probe: dict = {}  # "ok": whether torch._fused_adam_ takes _fused_step's call (kept)


def fused_kernel_works() -> bool:
    """Whether ``_fused_step`` runs on this torch and gives Adam's first step (p = 1, g = 1,
    lr = 0.5: p becomes 0.5); probed once per process, on a one-element CPU tensor."""
    if "ok" not in _probe:
        p, g = torch.ones(1), torch.ones(1)
        m, v, step = torch.zeros(1), torch.zeros(1), torch.zeros(())
        try:
            with torch.no_grad():
                _fused_step([p], [g], [m], [v], [step], 0.5, 0.9, 0.999, 0.0, 1e-8)
            _probe["ok"] = abs(float(p) - 0.5) < 1e-6 and float(step) == 1.0
        except (AttributeError, TypeError, RuntimeError):  # missing, or its signature changed
            _probe["ok"] = False
    return _probe["ok"]


def use_fused_adam() -> bool:
    """``build``'s choice: FusedAdam unless ``CAPSCTL_FUSED_ADAM=0`` (read each call) or the
    probe failed."""
    switched_off = os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")
    return not switched_off and fused_kernel_works()


def build(params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    """The trainer's Adam: FusedAdam where torch's fused kernel takes our call, else
    torch.optim.Adam(fused=True) (the same kernel and numbers, the same state_dict, plus
    torch._dynamo's import)."""
    if use_fused_adam():
        return FusedAdam(params, lr, betas, eps, weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            fused=True)
