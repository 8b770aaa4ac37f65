"""The train/test split of the shared data: by a hash of the instruction text (shared/data/README.md)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def is_test_instruction(instruction: str) -> bool:
    """True when the instruction belongs to the TEST split (about 1 in 10); never train on these."""
    return int(hashlib.sha256(instruction.encode("utf-8")).hexdigest(), 16) % 10 == 0


def shared_data_dir() -> Path:
    """The AlpacaEval folder of shared/: $APAR_SHARED_DATA, else ../shared/data/alpaca_eval from the repo."""
    env = os.environ.get("APAR_SHARED_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    return repo.parent / "shared" / "data" / "alpaca_eval"
