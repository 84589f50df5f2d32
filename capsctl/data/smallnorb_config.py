"""Options of ``smallnorb``, beside ``smallnorb.py``. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from capsctl.data.mnist_config import DataFiles
from capsctl.fields import field


@dataclass
class SmallNORBConfig(DataFiles):
    name: str = field("smallnorb", "dataset: smallnorb (5 toy categories, stereo 96x96 -> 48x48, "
                      "32x32 crops; EM paper)")
