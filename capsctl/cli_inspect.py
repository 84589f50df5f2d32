"""reconstruct, perturb and routes: pictures from a checkpoint (registered on capsctl.cli.app)."""

from __future__ import annotations
