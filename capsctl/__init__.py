"""capsctl: train, evaluate and inspect Capsule Networks from YAML experiments."""

__version__ = "0.1.0"
