"""What every capsctl model is and returns. The trainer, ``eval`` and the inspection commands
read models only through this contract; nothing probes attribute names. ``build_model``
returns a ``CapsctlModel``; the inspection code (capsctl/inspection/probe.py) is typed against
it, and tests/test_contract.py checks that every family in MODELS satisfies it (and
``CanDecode`` where it declares a decoder, ``HasVotes`` where its capsules are vectors).

Shape legend: B batch, C channels, H/W image height/width, J classes (class capsules), D a class
capsule's components (16 for CapsNet vectors, 16 = a flattened 4x4 pose for EM capsules), I
routed children, N = C*H*W pixels of one reconstruction, K reconstructions per example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypedDict, runtime_checkable

if TYPE_CHECKING:  # annotations only: this module stays importable without torch
    from torch import Tensor


class ModelOutput(TypedDict, total=False):
    """``forward(x_BCHW, y=None, keep_routing=False)`` returns these keys:

    scores   (B, J) fp32, always: the class scores argmax predicts from (capsule lengths for
             CapsNet, activations for EM capsules, logits for ``cnn``, sigmoid probabilities
             for ``multimnist-cnn``)
    v        (B, J, D) class capsule vectors, when ``capsule_key == "v"``
    pose     (B, J, 16) class capsule poses, when ``capsule_key == "pose"``
    recon    (B, N) reconstruction from the capsule of ``y`` (or of the prediction when ``y`` is
             None); (B, K, N) when ``y`` is (B, K): one per listed class. Only when
             ``has_decoder``.
    routing  list over passes of (B, I, J) couplings / assignments of the routed layer, when
             ``keep_routing`` and ``routing_layout`` is not None
    logits   (B, J) pre-sigmoid outputs (``multimnist-cnn``: what its loss uses)
    """

    scores: "Tensor"
    v: "Tensor"
    pose: "Tensor"
    recon: "Tensor"
    routing: "list[Tensor]"
    logits: "Tensor"


@runtime_checkable
class CapsctlModel(Protocol):
    """The declarations every model class makes (class attributes or properties), and its
    forward."""

    capsule_key: str | None
    """``"v"`` (vector capsules), ``"pose"`` (matrix capsules) or None (no class capsules)."""

    routing_label: str | None
    """What ``out["routing"]`` holds, for figure labels ("coupling c_ij", "assignment R"); None
    when the model does not route."""

    @property
    def has_decoder(self) -> bool:
        """True when ``forward`` returns ``recon`` and ``decode`` works."""

    @property
    def routing_layout(self) -> tuple[int, int, int] | None:
        """(types, H, W) of the routed children: child i of ``out["routing"]`` is type
        i // (H*W) at grid row (i // W) % H, column i % W; None when the model does not route."""

    def __call__(self, x_BCHW: "Tensor", y: "Tensor | None" = None,
                 keep_routing: bool = False) -> ModelOutput: ...


@runtime_checkable
class CanDecode(Protocol):
    """What a model that declares ``has_decoder`` adds (its class may have it with no decoder
    built: ``has_decoder`` says)."""

    def decode(self, capsules_BJD: "Tensor", classes_B: "Tensor") -> "Tensor":
        """Reconstruction (B, N) from the capsule of ``classes_B`` alone (others masked);
        ``classes`` (B, K) gives (B, K, N). Only when ``has_decoder``."""


@runtime_checkable
class HasVotes(Protocol):
    """What a model with vector capsules (``capsule_key == "v"``) adds."""

    def votes(self, x_BCHW: "Tensor") -> "Tensor":
        """u_hat (B, I, J, D): the routed children's predictions for the class capsules (EM
        votes are 4x4 matrices per patch: not this)."""
