"""Where the AlpacaEval data is, and its train/test split: by a hash of the instruction text
(data/alpaca_eval/README.md)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from apar.engine.errors import UserError

DATA_ENV = "APAR_DATA"
# The repository's compressed copy of the AlpacaEval responses (`apar data import` writes it).
REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "alpaca_eval"


def is_test_instruction(instruction: str) -> bool:
    """True when the instruction belongs to the TEST split (about 1 in 10); never train on these."""
    return int(hashlib.sha256(instruction.encode("utf-8")).hexdigest(), 16) % 10 == 0


def data_dir(explicit: str | Path | None = None) -> Path:
    """The AlpacaEval folder: `explicit` (a command's --data), else $APAR_DATA, else <repo>/data/alpaca_eval.

    A `UserError` when that folder is missing or holds no data file (.json, .jsonl, or either as .xz).
    """
    from apar.data.readers import data_files

    if explicit:
        path, origin = Path(explicit), "--data"
    elif os.environ.get(DATA_ENV):
        path, origin = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    else:
        path, origin = REPO_DATA, f"the repository's copy; --data DIR or ${DATA_ENV} names another"
    if not path.is_dir():
        raise UserError(f"{path}: data folder not found ({origin})")
    if not data_files(path):
        raise UserError(f"{path}: data folder holds no .json, .jsonl, .json.xz or .jsonl.xz files ({origin})")
    return path
