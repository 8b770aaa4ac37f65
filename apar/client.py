"""The streaming client behind `apar generate --server`: the same flags and output as in-process.

`--tls` (the system's CAs) or `--ca PEM` connects over TLS; the key of `--api-key-file PATH` (its first
line), else `$APAR_API_KEY`, is sent as the metadata `authorization: Bearer KEY`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc

from apar.engine.errors import UserError
from apar.text.stream import Final

_STATUS_WORDS = {grpc.StatusCode.INVALID_ARGUMENT: "invalid request", grpc.StatusCode.RESOURCE_EXHAUSTED:
                 "server is full", grpc.StatusCode.UNAVAILABLE: "server unavailable",
                 grpc.StatusCode.DEADLINE_EXCEEDED: "deadline exceeded",
                 grpc.StatusCode.UNAUTHENTICATED: "unauthenticated (give --api-key-file or $APAR_API_KEY)"}


def build_request(args, params, pb):
    from services.protocol.wire import params_to_pb

    A = pb.apar_pb2
    sampling, limits, ar = params_to_pb(params, pb)
    mode = A.STREAM_MODE_FINAL if args.json else (A.STREAM_MODE_THREADS if args.stream == "threads"
                                                  else A.STREAM_MODE_LINEAR)
    return A.GenerateRequest(prompt=args.prompt, sampling=sampling, limits=limits, auto_regressive=ar, stream=mode,
                             raw_prompt=args.no_chat_template)


def open_channel(args) -> grpc.Channel:
    """A channel to --server: TLS with --tls or --ca, else plaintext."""
    ca = getattr(args, "ca", None)
    name = getattr(args, "tls_server_name", None)
    if not (getattr(args, "tls", False) or ca):
        if name:
            raise UserError("--tls-server-name needs --tls or --ca")
        return grpc.insecure_channel(args.server)
    root = None
    if ca:
        try:
            root = Path(ca).read_bytes()
        except OSError as exc:
            raise UserError(f"--ca: cannot read {ca}: {exc.strerror}") from None
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(args.server, grpc.ssl_channel_credentials(root_certificates=root), options=options)


def call_metadata(args) -> tuple[tuple[str, str], ...]:
    """The call's metadata: the API key of --api-key-file or $APAR_API_KEY, if any."""
    from services.security import API_KEY_ENV

    path = getattr(args, "api_key_file", None)
    if path is not None:
        try:
            lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--api-key-file: cannot read {path}: "
                            f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
        key = next((line for line in lines if line and not line.startswith("#")), None)
        if key is None:
            raise UserError(f"--api-key-file: {path} holds no key")
    else:
        key = os.environ.get(API_KEY_ENV) or None
    if key is None:
        return ()
    key = key.strip()
    if not key or any(not 0x21 <= ord(c) <= 0x7e for c in key):
        raise UserError("the API key must be printable ASCII without spaces")
    return (("authorization", f"Bearer {key}"),)


def generate_remote(args, params) -> int:
    from apar.commands.generate import print_final, show_thread_event, thread_view
    from apar.protogen import stubs

    pb = stubs()
    A = pb.apar_pb2
    request = build_request(args, params, pb)
    out = sys.stdout
    kinds = {A.ThreadEvent.STARTED: "started", A.ThreadEvent.DELTA: "delta", A.ThreadEvent.FINISHED: "finished"}
    final = None
    view = thread_view(args)
    metadata = call_metadata(args)
    with open_channel(args) as channel:
        try:  # a server that is still starting (loading its model) is waited for
            grpc.channel_ready_future(channel).result(timeout=args.connect_timeout)
        except grpc.FutureTimeoutError:
            raise UserError(f"server unavailable: no answer from {args.server} within "
                            f"{args.connect_timeout:g} s") from None
        stub = pb.apar_pb2_grpc.AparStub(channel)
        try:
            for resp in stub.Generate(request, timeout=getattr(args, "timeout", None), metadata=metadata):
                kind = resp.WhichOneof("event")
                if kind == "delta":
                    out.write(resp.delta)
                    out.flush()
                elif kind == "thread":
                    t = resp.thread
                    show_thread_event({"kind": kinds.get(t.kind, "unknown"), "thread": t.thread,
                                       "parent": t.parent if t.HasField("parent") else None,
                                       "anchor": t.anchor, "text": t.text, "reason": t.finish_reason or None}, view)
                elif kind == "final":
                    f = resp.final
                    usage = {k.name: getattr(f.usage, k.name) for k in f.usage.DESCRIPTOR.fields}
                    final = Final(f.text, f.finish_reason, usage, f.error or None)
        except grpc.RpcError as exc:
            code = exc.code()
            words = _STATUS_WORDS.get(code, code.name.lower())
            raise UserError(f"{words}: {exc.details()}") from None
    if final is None:
        raise UserError("the server ended the stream without a final message")
    return print_final(final, args)
