"""What every service uses to lock itself: TLS and mutual TLS for gRPC, API keys, and secrets kept out of logs.

Torch-free (the router imports it). Nothing here ever logs or formats a key, a password or a private key:
API keys appear in logs only as `key_id` (the first 8 hex characters of their SHA-256), Redis URLs only
through `mask_url`.

- **TLS files** (`TLSFiles`): a certificate chain and its private key, and for mutual TLS the CA that
  peers' certificates must come from. A server with a CA requires a client certificate from it
  (`require_client_auth`); a client with one checks the server against it and presents its own
  certificate. `server_name` makes a client check peers against that name instead of the host it dials
  (internal services are dialled by pod IP; their certificates name the service).
- **API keys** (`ApiKeys`): from flags and/or a file of one key per line, re-read when the file changes
  (its mtime, size or inode, looked at most once a second). Keys are kept as SHA-256 digests and a
  presented key is compared against every one of them with `hmac.compare_digest`.
- **Redis**: the password from `--redis-password-file` or `$APAR_REDIS_PASSWORD` is put into the URL
  handed to redis-py; TLS is the URL's (`rediss://`, with `?ssl_ca_certs=PATH` for a private CA).
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from apar.engine.errors import UserError

log = logging.getLogger(__name__)

REDIS_PASSWORD_ENV = "APAR_REDIS_PASSWORD"
API_KEY_ENV = "APAR_API_KEY"  # the client's (`apar generate --server`)
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: what gRPC metadata can carry


# ---- secrets out of logs ------------------------------------------------------------------------------
def key_id(key: str | bytes) -> str:
    """A short, safe name of an API key for logs: the first 8 hex characters of its SHA-256."""
    return hashlib.sha256(key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def mask_url(url: str | None) -> str:
    """A URL with its password (userinfo after the first colon, and any `password=` query value) as ***."""
    if not url:
        return str(url)
    out = url
    scheme_end = out.find("://")
    if scheme_end >= 0:
        rest = out[scheme_end + 3:]
        at = rest.rfind("@")
        if at >= 0:
            userinfo = rest[:at]
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            out = out[:scheme_end + 3] + userinfo + rest[at:]
    return re.sub(r"(?i)((?:^|[?&;])password=)[^&;#]*", r"\1***", out)


# ---- TLS ----------------------------------------------------------------------------------------------
def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise UserError(f"{what}: {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class TLSFiles:
    """A certificate chain and private key (PEM), and optionally the CA peers must be signed by."""

    cert_path: str
    key_path: str
    ca_path: str | None = None
    server_name: str | None = None  # clients: check the peer's certificate against this name
    cert: bytes = field(default=b"", repr=False)
    key: bytes = field(default=b"", repr=False)
    ca: bytes | None = field(default=None, repr=False)
    peer_names: tuple[str, ...] = ()  # servers: the names (subjectAltName) a caller's certificate must carry one of

    @classmethod
    def load(cls, cert: str | None, key: str | None, ca: str | None = None, server_name: str | None = None,
             flags: str = "--tls", need_ca: bool = False) -> TLSFiles | None:
        """The files named by a service's flags (`{flags}-cert`, `-key`, `-ca`), read now; None when none
        is given. Refuses half a setup with a clear error."""
        given = {f"{flags}-cert": cert, f"{flags}-key": key, f"{flags}-ca": ca}
        if not any(given.values()):
            if server_name:
                raise UserError(f"{flags}-server-name needs {flags}-cert, {flags}-key and {flags}-ca")
            return None
        wanted = [f"{flags}-cert", f"{flags}-key"] + ([f"{flags}-ca"] if need_ca else [])
        missing = [name for name in wanted if not given[name]]
        if missing:
            raise UserError(f"{', '.join(missing)} missing: TLS needs {' '.join(wanted)} together")
        files = cls(str(cert), str(key), ca, server_name or None, _read(cert, f"{flags}-cert"),
                    _read(key, f"{flags}-key"), _read(ca, f"{flags}-ca") if ca else None)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(files.cert_path, files.key_path)
        except (ssl.SSLError, OSError):
            raise UserError(f"{flags}-cert {cert} and {flags}-key: not a certificate chain and its private key "
                            "(a key that does not match, or an encrypted key)") from None
        if ca:
            try:
                context.load_verify_locations(cafile=ca)
            except (ssl.SSLError, OSError):
                raise UserError(f"{flags}-ca {ca}: not a CA certificate") from None
        return files

    @property
    def mutual(self) -> bool:
        return self.ca is not None

    def describe(self) -> str:
        if self.peer_names:
            return f"mutual TLS, callers {','.join(self.peer_names)}"
        return "mutual TLS" if self.mutual else "TLS"


def server_credentials(tls: TLSFiles):
    import grpc

    return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                       require_client_auth=tls.ca is not None)


def channel_credentials(tls: TLSFiles):
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)


def open_port(server, address: str, tls: TLSFiles | None) -> int:
    """Bind `address` on a gRPC server (sync or aio), with TLS when `tls` is given; returns the port."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def internal_interceptors(token, what: str, tls: TLSFiles | None = None) -> list:
    """The server interceptors of an internal service: the cluster token's check, when it has one, and the
    check of the callers' certificates' names (services/peer_names.py), when its TLS files name them."""
    out = []
    if token is not None:
        from services.cluster_auth import ClusterAuthServer

        out.append(ClusterAuthServer(token, what))
    if tls is not None and tls.peer_names:
        from services.peer_names import PeerNamesServer

        out.append(PeerNamesServer(tls.peer_names, what))
    return out


def channel_options(tls: TLSFiles | None) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", tls.server_name)] if tls is not None and tls.server_name else []


def open_channel(address: str, tls: TLSFiles | None = None, aio: bool = False, options: list | None = None,
                 token=None):
    """A gRPC channel to an internal service: plaintext, or (mutual) TLS with this service's own files;
    with `token` (a `cluster_auth.ClusterToken`) every call carries its proof of the token and every
    unary answer must prove the server holds it too."""
    import grpc

    opts = [*(options or []), *channel_options(tls)]
    mod = grpc.aio if aio else grpc
    kw = {}
    if token is not None and aio:
        from services.cluster_auth import aio_client_interceptors

        kw["interceptors"] = aio_client_interceptors(token)
    if tls is None:
        channel = mod.insecure_channel(address, options=opts, **kw)
    else:
        channel = mod.secure_channel(address, channel_credentials(tls), options=opts, **kw)
    if token is not None and not aio:
        from services.cluster_auth import intercept_sync

        channel = intercept_sync(channel, token)
    return channel


def add_internal_tls_args(p: argparse.ArgumentParser, flags: str = "--tls", client: bool = True,
                          peers: bool = False) -> None:
    """`{flags}-cert`, `-key`, `-ca` (and, for services that dial others, `-server-name`; for services that
    others call, `-peer-names`)."""
    g = p.add_argument_group("internal mutual TLS (all three files together)")
    g.add_argument(f"{flags}-cert", default=None, metavar="PEM", help="this service's certificate chain")
    g.add_argument(f"{flags}-key", default=None, metavar="PEM", help="its private key")
    g.add_argument(f"{flags}-ca", default=None, metavar="PEM",
                   help="the CA every peer's certificate must come from; peers without one are refused")
    if client:
        g.add_argument(f"{flags}-server-name", default=None, metavar="NAME",
                       help="check the services this one dials against NAME (a DNS name in their "
                            "certificates) instead of the address dialled, e.g. a pod IP")
    if peers:
        g.add_argument(f"{flags}-peer-names", default=None, metavar="NAME[,NAME]",
                       help="answer only callers whose certificate names one of these (subjectAltName DNS "
                            "names: a certificate per role, e.g. apar-router); default: any certificate "
                            "of the CA. Health checks stay open")


def internal_tls(args, flags: str = "--tls") -> TLSFiles | None:
    dest = flags.lstrip("-").replace("-", "_")
    tls = TLSFiles.load(getattr(args, f"{dest}_cert", None), getattr(args, f"{dest}_key", None),
                        getattr(args, f"{dest}_ca", None), getattr(args, f"{dest}_server_name", None),
                        flags=flags, need_ca=True)
    peers = getattr(args, f"{dest}_peer_names", None)
    if peers is None:
        return tls
    from services.peer_names import parse_peer_names

    names = parse_peer_names(peers, f"{flags}-peer-names")
    if tls is None:
        raise UserError(f"{flags}-peer-names needs {flags}-cert, {flags}-key and {flags}-ca")
    return replace(tls, peer_names=names)


# ---- API keys -----------------------------------------------------------------------------------------
def bearer(value: str | bytes | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` value, or None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_key_lines(text: str) -> tuple[list[str], list[int]]:
    """(the keys of a key file, the numbers of its bad lines): one key per line, surrounding spaces
    dropped; blank lines and `#` lines skipped; a line that is not one printable ASCII word is bad."""
    keys, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _KEY_CHARS.match(line):
            keys.append(line)
        else:
            bad.append(n)
    return keys, bad


class ApiKeys:
    """The accepted API keys: fixed ones (given in code) plus a file's, re-read when the file changes.

    The file is the truth as it stands: once it is gone or unreadable it holds no keys (every key it
    held is refused); a bad line is skipped, with a warning naming its number (never its text), and the
    other lines apply, so one typo never keeps a revoked key valid."""

    def __init__(self, keys: list[str] | tuple[str, ...] = (), path: str | None = None,
                 check_every_s: float = 1.0) -> None:
        for k in keys:
            if not _KEY_CHARS.match(k):
                raise UserError("an API key is printable ASCII without spaces")
        if path is not None and not path:
            raise UserError("--api-key-file is empty: give the path of the key file")
        self._fixed = [_digest(k) for k in keys]
        self.path = path
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._file: list[bytes] = []
        self._sig: tuple | None = None
        self._checked = 0.0
        if path is not None:
            self._load(initial=True)
            self._checked = time.monotonic()

    def __len__(self) -> int:
        return len(self._fixed) + len(self._file)

    def _signature(self) -> tuple:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, initial: bool = False) -> None:
        try:
            sig = self._signature()
            if sig == self._sig:
                return
            text = Path(self.path).read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            if initial:
                raise UserError(f"--api-key-file: cannot read {self.path}: {exc.strerror}") from None
            if self._sig is not None or self._file:
                log.warning("API key file %s unreadable (%s): no key of it is accepted until it is back",
                            self.path, exc.strerror)
            self._file, self._sig = [], None
            return
        keys, bad = parse_key_lines(text)
        if bad:
            log.warning("API key file %s: line%s %s skipped (an API key is printable ASCII without spaces)",
                        self.path, "s" if len(bad) > 1 else "", ", ".join(map(str, bad[:20])))
        self._file = [_digest(k) for k in keys]
        self._sig = sig
        if not keys and not self._fixed:
            log.warning("API key file %s holds no key: every request but health checks is refused until "
                        "one is added", self.path)
        if not initial:
            log.info("API key file %s re-read: %d keys", self.path, len(self._file))

    def _refresh(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked < self.check_every_s:
            return
        with self._lock:
            if now - self._checked < self.check_every_s:
                return
            self._checked = now
            self._load()

    def check(self, presented: str | None) -> bool:
        """Whether `presented` is one of the keys; the same work for every key, in constant time each."""
        self._refresh()
        if presented is None:
            return False
        digest = _digest(presented)
        ok = False
        for k in (*self._fixed, *self._file):
            ok |= hmac.compare_digest(digest, k)
        return ok


class RefusedSecretFlag(argparse.Action):
    """A flag that would put a secret on the command line (any local user reads it with `ps`): refused
    with what to use instead (`help` holds that advice)."""

    def __init__(self, option_strings, dest, instead: str = "", **kw) -> None:
        self.instead = instead
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        raise argparse.ArgumentError(self, "a secret on the command line is readable by every local user "
                                           f"(ps, /proc): {self.instead}")


# ---- Redis --------------------------------------------------------------------------------------------
def add_redis_password_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-password-file", default=None, metavar="PATH",
                   help=f"read the Redis password from this file (else ${REDIS_PASSWORD_ENV}, else the URL's); "
                        "TLS: a rediss:// URL, ?ssl_ca_certs=PATH for a private CA")


def add_kvmanager_security_args(p: argparse.ArgumentParser) -> None:
    """`apar kvmanager`'s flags from here: its mutual TLS (a server: no server name; its callers' names) and
    the Redis password."""
    add_internal_tls_args(p, "--tls", client=False, peers=True)
    add_redis_password_args(p)


def kvmanager_security(args) -> tuple[str | None, TLSFiles | None]:
    """(the Redis URL to connect with, password included: never print it; the KV manager's TLS files)."""
    if not args.no_redis and mask_url(args.redis) != args.redis:
        raise UserError(f"--redis {mask_url(args.redis)} holds a password, and a command line is readable by every "
                        "local user (ps, /proc): give the URL without it, and the password with "
                        f"--redis-password-file or ${REDIS_PASSWORD_ENV}")
    url = None if args.no_redis else redis_url_with_password(args.redis, args.redis_password_file)
    return url, internal_tls(args, "--tls")


def redis_url_with_password(url: str, password_file: str | None = None, env: dict | None = None) -> str:
    """`url` with the password from `password_file` or $APAR_REDIS_PASSWORD put in (percent-encoded);
    a password given twice is refused. The result holds the secret: only ever print `mask_url` of it."""
    env = os.environ if env is None else env
    password = None
    if password_file:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--redis-password-file: cannot read {password_file}: "
                            f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
        if not password:
            raise UserError(f"--redis-password-file: {password_file} is empty")
    elif env.get(REDIS_PASSWORD_ENV):
        password = env[REDIS_PASSWORD_ENV]
    if password is None:
        return url
    scheme_end = url.find("://")
    if scheme_end < 0:
        raise UserError(f"--redis must be a redis://, rediss:// or unix:// URL, got {mask_url(url)!r}")
    if url.startswith("unix://"):
        if re.search(r"(?i)[?&]password=", url):
            raise UserError("the Redis password is given twice: in the URL and in a file or the environment")
        return url + ("&" if "?" in url else "?") + "password=" + quote(password, safe="")
    rest = url[scheme_end + 3:]
    netloc_end = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)])
    netloc = rest[:netloc_end]
    user = ""
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        if ":" in userinfo:
            raise UserError("the Redis password is given twice: in the URL and in a file or the environment")
        user = userinfo
    return f"{url[:scheme_end + 3]}{user}:{quote(password, safe='')}@{netloc}{rest[netloc_end:]}"
