"""capsctl data ...: dataset generators (registered on capsctl.cli.app)."""

from __future__ import annotations
