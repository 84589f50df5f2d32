"""Datasets: the registry (``registry.py``, torch-free), the builders (``build.py``), the
device-resident sources (``datasets.py``) and one module per dataset family with its options
beside it (``*_config.py``). Importing this package does not import torch."""
