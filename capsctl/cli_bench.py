"""capsctl bench: throughput and memory of a training step (registered on capsctl.cli.app)."""

from __future__ import annotations
