"""Models: the family registry (``registry.py``), the output contract (``contract.py``), and one
module per family with its config beside it. Importing this package does not import torch."""

from capsctl.models.registry import MODELS, build_model, count_parameters, loss_fn  # noqa: F401
