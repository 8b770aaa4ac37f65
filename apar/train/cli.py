"""`apar train` (fine-tune a local model directory on paragraph trees) and `apar demo-model`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from apar.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="fine-tune a local HF causal LM on paragraph trees (APAR form)",
        description="Fine-tune MODEL_DIR on the train split of DATA (conversations or a tree file), "
                    "evaluate on its test split (by instruction hash), write a model directory to --out.",
    )
    train.add_argument("model", type=Path, metavar="MODEL_DIR", help="local Hugging Face model directory")
    train.add_argument("data", type=Path, metavar="DATA",
                       help="AlpacaEval .json, prompt/response .jsonl, a directory, or a tree file")
    train.add_argument("--out", type=Path, required=True, help="model directory to write")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    train.add_argument("--max-length", type=int, default=1024, help="tokens of one packed sequence")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=10, help="print the mean loss every N steps")
    train.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: at end)")
    train.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    train.add_argument("--resume", action="store_true", help="go on from OUT/checkpoint")
    train.add_argument("--flat", action="store_true", help="train on restored linear text (AR twin)")
    train.add_argument("--fork-token", default="[Fork]", help="control token that forks a thread")
    train.add_argument("--child-token", default="[Child]", help="control token that starts a child")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    train.set_defaults(func=run_train)

    demo = subparsers.add_parser(
        "demo-model", help="train the small demo APAR model (or its AR twin) from scratch",
        description="Tokenizer and small Llama trained here on the shared data's train split, seeded.",
    )
    demo.add_argument("--preset", choices=("quick", "full"), default="quick",
                      help="quick: a couple of minutes on 2 CPU cores; full: the one for quality")
    demo.add_argument("--out", type=Path, required=True, help="model directory to write")
    demo.add_argument("--ar", action="store_true", help="the auto-regressive twin (responses flattened)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, help="override the preset's training steps")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    demo.set_defaults(func=run_demo)


def run_train(args: argparse.Namespace) -> int:
    from apar.data.pipeline import load_records
    from apar.train.trainer import CHECKPOINT, TrainConfig, add_control_tokens, load_model, train_records

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        max_length=args.max_length, seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
        save_every=args.save_every, flat=args.flat, fork_token=args.fork_token,
        child_token=args.child_token, device=args.device,
    )
    checkpoint = args.out / CHECKPOINT
    if args.resume and not checkpoint.is_dir():
        raise UserError(f"{checkpoint}: no checkpoint to resume from")
    if checkpoint.is_dir() and not args.resume:
        raise UserError(f"{args.out} holds a checkpoint: pass --resume, or choose another --out")
    records = load_records(args.data)
    model, tokenizer = load_model(checkpoint if args.resume else args.model)
    added = add_control_tokens(model, tokenizer, args.fork_token, args.child_token)
    if added:
        print(f"added control tokens {', '.join(added)}; embeddings resized to {len(tokenizer)}")
    result = train_records(model, tokenizer, records, config, args.out,
                           resume_from=checkpoint if args.resume else None,
                           extra={"base_model": str(args.model), "data": str(args.data)})
    _print_result(result, args.out)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from apar.train.demo import make_demo_model

    if args.steps is not None and args.steps <= 0:
        raise UserError("--steps must be positive")
    result = make_demo_model(args.preset, args.out, ar=args.ar, seed=args.seed, steps=args.steps,
                             device=args.device)
    _print_result(result, args.out)
    return 0


def _print_result(result, out: Path) -> None:
    from dataclasses import asdict

    print(json.dumps({"out": str(out), **asdict(result)}, indent=2))
