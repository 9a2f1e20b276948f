"""A callback the Hydra CLI tests inject into real runs (``+callbacks.argv._target_=...``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L


class RecordArgv(L.Callback):
    """At fit start, write ``sys.argv`` to ``path``: what Lightning relaunches DDP children with."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.path.write_text(json.dumps(sys.argv))
