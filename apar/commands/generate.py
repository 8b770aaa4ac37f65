"""`apar generate`: one prompt through the engine in this process (or, later, through a server)."""
from __future__ import annotations

import argparse
import json
import sys

from apar.engine.errors import UserError


def register(subparsers) -> None:
    from services.security import RefusedSecretFlag

    p = subparsers.add_parser("generate", help="generate an answer with parallel threads",
                              description="Generate one answer. Temperature 0 (the default) is greedy.")
    p.add_argument("--model", help="local Hugging Face model directory (in-process generation)")
    p.add_argument("--server", help="HOST:PORT of an `apar serve` or `apar router` to stream from instead")
    p.add_argument("--connect-timeout", type=float, default=180.0,
                   help="with --server: seconds to wait for a server that is still starting (a first start on "
                        "a CPU builds the rows kernel, about a minute)")
    p.add_argument("--tls", action="store_true", help="with --server: connect over TLS (the system's CAs)")
    p.add_argument("--ca", default=None, metavar="PEM", help="with --server: TLS, trusting this CA (implies --tls)")
    p.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="with --server: check the server's certificate against NAME instead of the address")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="with --server: send 'authorization: Bearer KEY', KEY the file's first line "
                        "(default: $APAR_API_KEY)")
    p.add_argument("--api-key", action=RefusedSecretFlag, instead="give --api-key-file PATH or $APAR_API_KEY")
    p.add_argument("--prompt", required=True, help="the prompt (the chat template is applied when the "
                                                   "tokenizer has one)")
    p.add_argument("--ar", action="store_true", help="auto-regressive mode: never fork (the baseline)")
    p.add_argument("--stream", choices=("linear", "threads"), default="linear",
                   help="linear: restored text as it becomes final; threads: one JSON line per thread event")
    p.add_argument("--json", action="store_true", help="print one final JSON object instead of streaming")
    p.add_argument("--max-tokens", type=int, default=256, help="generated tokens over all threads")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0; > 1 divides positive logits (multiplies negative ones) of tokens in the thread's "
                        "context, prompt included (HF/vLLM; default 1: off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="[-2, 2]: minus count x this for each token the thread's context generated (OpenAI)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="[-2, 2]: minus this for each token the thread's context generated at least once (OpenAI)")
    p.add_argument("--max-threads", type=int, default=16, help="threads per request, the root included")
    p.add_argument("--max-depth", type=int, default=4, help="how deep forks may nest")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as given")
    add_engine_args(p)
    p.set_defaults(func=run)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--fork-token", default="[Fork]", help="control token string that forks "
                                                          "([SplitMask] for the published APAR checkpoints)")
    g.add_argument("--child-token", default="[Child]", help="control token string a child starts with "
                                                            "([SplitSop] for the published APAR checkpoints)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-blocks", type=int, default=None, help="KV blocks in the pool (default: from --kv-memory-mb)")
    g.add_argument("--kv-memory-mb", type=float, default=256.0, help="KV pool size when --kv-blocks is not given")
    g.add_argument("--max-batch-tokens", type=int, default=512, help="tokens computed per step")
    g.add_argument("--admit-watermark", type=float, default=0.04,
                   help="share of the KV pool kept free when admitting a request (default 0.04)")
    g.add_argument("--fork-watermark", type=float, default=0.01,
                   help="share of the KV pool below which new forks are refused (default 0.01)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    from apar.engine.config import ATTENTION_CHOICES

    g.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="how threads attend their contexts: auto (triton on CUDA, cascade on CPU), portable "
                        "(gather + SDPA), cascade (shared prefixes read once), flex (FlexAttention), triton "
                        "(cascade's plan in Triton kernels; interpreted, slow, on CPU)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA: replay decode steps as CUDA graphs (with flex or triton attention; default on)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each decoder layer as one graph (the attention an opaque op): norms, rotary "
                        "embedding with the K/V write, activation and residual adds fuse into a few kernels; the "
                        "engine compiles in a warm-up before its first request (default: on with CUDA, off on the CPU)")
    g.add_argument("--rows-kernel", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU in float32: matrix products of up to 16 rows (decode steps, drafted tokens) "
                        "through the project's AVX2 kernel, built once per machine (about a minute); torch's "
                        "BLAS multiplies 2-16 rows 2-3x slower than one (default on)")
    g.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the cached KV blocks of a prompt's longest known prefix, prefill only the rest; "
                        "prompts' blocks stay cached until evicted (default on)")
    from apar.engine.config import DRAFT_POLICIES, MAX_SPECULATIVE_TOKENS, SPECULATE_CHOICES

    g.add_argument("--speculate", default="off", choices=SPECULATE_CHOICES,
                   help="speculation inside every thread: ngram drafts a thread's next tokens by looking its last "
                        "tokens up in its own context (prompt, ancestors, itself); medusa from the heads "
                        "`apar train-medusa` saved in the model's directory; verified in the same step; "
                        "greedy answers stay token for token the same (default off)")
    g.add_argument("--num-speculative-tokens", type=int, default=4,
                   help=f"tokens a thread drafts per step, 1..{MAX_SPECULATIVE_TOKENS} (default 4)")
    g.add_argument("--draft-policy", default="pays", choices=DRAFT_POLICIES,
                   help="pays: a step takes the drafted tokens that raise its expected tokens per second, from "
                        "what this engine's steps cost by rows and how often drafts held (a thread sampled "
                        "with a seed drafts every token, so its seed repeats); all: every drafted token "
                        "(default pays)")


def engine_config(args):
    from apar.engine.config import ControlTokens, EngineConfig, SpeculativeConfig

    return EngineConfig(block_size=args.block_size, num_blocks=args.kv_blocks, kv_memory_mb=args.kv_memory_mb,
                        max_batch_tokens=args.max_batch_tokens, admit_watermark=args.admit_watermark,
                        fork_watermark=args.fork_watermark, device=args.device, dtype=args.dtype,
                        attention=args.attention, cuda_graphs=args.cuda_graphs, compile=args.compile,
                        rows_kernel=args.rows_kernel, prefix_cache=args.prefix_cache,
                        control=ControlTokens(fork=args.fork_token, child=args.child_token),
                        speculate=SpeculativeConfig(args.speculate, args.num_speculative_tokens,
                                                            policy=args.draft_policy))


def sampling_params(args):
    from apar.engine.params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, auto_parallel=not args.ar,
                          max_threads=args.max_threads, max_depth=args.max_depth,
                          repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                          presence_penalty=args.presence_penalty)


def run(args) -> int:
    params = sampling_params(args)  # bad sampling values fail before the model loads
    if not args.prompt.strip():
        raise UserError("prompt is empty")
    if args.server:
        from apar.client import generate_remote

        return generate_remote(args, params)
    if not args.model:
        raise UserError("give --model DIR (in-process) or --server HOST:PORT")
    from apar.engine.engine import Engine
    from apar.quiet import quiet_transformers
    from apar.text.prompt import encode_prompt
    from apar.text.stream import Final, LinearDelta, RequestStream

    quiet_transformers()
    engine = Engine(args.model, engine_config(args))
    prompt = encode_prompt(engine.tokenizer, args.prompt, use_chat_template=not args.no_chat_template)
    rid = engine.add_request(prompt, params)
    stream = RequestStream(engine.tokenizer, engine.fork_id, engine.child_id, engine.eos_ids)
    out = sys.stdout
    view = thread_view(args)
    while engine.has_work():
        for event in engine.step().events:
            if event.request != rid:
                continue
            for item in stream.feed(event):
                if args.json:
                    continue
                if isinstance(item, LinearDelta) and args.stream == "linear":
                    out.write(item.text)
                    out.flush()
                elif args.stream == "threads" and not isinstance(item, (LinearDelta, Final)):
                    show_thread_event({k: getattr(item, k) for k in item.__slots__}, view)
    return print_final(stream.final, args)


def thread_view(args):
    """Threads side by side when stdout is a terminal; None: JSON lines."""
    if args.stream == "threads" and not args.json and sys.stdout.isatty():
        from apar.threadview import ThreadView

        return ThreadView(sys.stdout)
    return None


def show_thread_event(event: dict, view) -> None:
    if view is None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    else:
        view.event(event["kind"], event["thread"], event["parent"], event["text"], event["reason"])


def print_final(final, args) -> int:
    """The end of the output, alike in-process and from a server."""
    out = sys.stdout
    if args.json:
        print(json.dumps({"text": final.text, "finish_reason": final.finish_reason, "usage": final.usage,
                          "error": final.error}, ensure_ascii=False))
    elif args.stream == "linear":
        out.write("\n")
    elif sys.stdout.isatty():
        print(f"\n{final.text}\n[{final.finish_reason}] {json.dumps(final.usage)}")
    else:
        print(json.dumps({"final": final.text, "finish_reason": final.finish_reason, "usage": final.usage},
                         ensure_ascii=False))
    return 0 if final.error is None else 1
