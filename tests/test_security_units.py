"""Security units without a server: masked URLs, Redis passwords, bearer parsing, API key files, TLS
flags, the guard's limits, and prefix-cache salts per key."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest

from apar.engine.errors import UserError
from services.router.guard import Caller, Guard, Limits, Refused
from services.security import ApiKeys, TLSFiles, bearer, key_id, mask_url, redis_url_with_password
from tests.security_helpers import KEYS, ROOT, pb, pki  # noqa: F401 (fixtures)


# ---------------------------------------------------------------- units: keys, URLs, limits

def test_mask_url_hides_passwords():
    assert mask_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert mask_url("rediss://default:p@ss:w@rd@h:6380/2?ssl_ca_certs=/ca.pem") == \
        "rediss://default:***@h:6380/2?ssl_ca_certs=/ca.pem"
    assert mask_url("unix:///run/redis.sock?db=0&password=s3cret") == "unix:///run/redis.sock?db=0&password=***"
    assert mask_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert mask_url(None) == "None"


def test_redis_password_from_file_or_env_goes_into_the_url(tmp_path):
    import redis

    pw = tmp_path / "pw"
    pw.write_text("p@ss/w:rd?#\n")
    url = redis_url_with_password("rediss://default@redis.example.com:6380/2?ssl_ca_certs=/ca.pem", str(pw), {})
    parsed = redis.connection.parse_url(url)
    assert (parsed["username"], parsed["password"], parsed["host"], parsed["port"], parsed["db"]) == \
        ("default", "p@ss/w:rd?#", "redis.example.com", 6380, 2)
    assert parsed["ssl_ca_certs"] == "/ca.pem" and "p@ss" not in mask_url(url)
    env_url = redis_url_with_password("redis://r:6379/0", None, {"APAR_REDIS_PASSWORD": "from-env"})
    assert redis.connection.parse_url(env_url)["password"] == "from-env"
    unix = redis_url_with_password("unix:///s.sock?db=1", None, {"APAR_REDIS_PASSWORD": "x&y"})
    assert redis.connection.parse_url(unix)["password"] == "x&y"
    assert redis_url_with_password("redis://r:6379/0", None, {}) == "redis://r:6379/0"
    with pytest.raises(UserError, match="given twice"):
        redis_url_with_password("redis://:inline@r:6379/0", str(pw), {})
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        redis_url_with_password("redis://r:6379/0", str(empty), {})


def test_bearer_parsing():
    assert bearer("Bearer abc") == "abc" and bearer("bearer   abc ") == "abc" and bearer(b"Bearer abc") == "abc"
    for bad in (None, "", "Bearer", "Bearer ", "Basic abc", "abc"):
        assert bearer(bad) is None


def test_api_key_file_is_reread_when_it_changes(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text("# keys\nfirst-key\n\n  second-key  \n")
    keys = ApiKeys(["fixed-key"], str(path), check_every_s=0.0)
    assert len(keys) == 3 and all(keys.check(k) for k in ("first-key", "second-key", "fixed-key"))
    assert not keys.check("first-key ") and not keys.check("") and not keys.check(None)
    path.write_text("third-key\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert keys.check("third-key") and not keys.check("first-key") and keys.check("fixed-key")
    path.write_text("")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert not keys.check("third-key") and keys.check("fixed-key")  # an empty file: no file keys
    slow = ApiKeys([], str(path), check_every_s=3600)
    path.write_text("late-key\n")
    assert not slow.check("late-key")  # looked at most once per check_every_s


def test_key_file_cases_a_bad_line_a_missing_file_an_empty_flag(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text("kept-key\nrevoked-key\n")
    keys = ApiKeys([], str(path), check_every_s=0.0)
    assert keys.check("revoked-key")
    with caplog.at_level(logging.WARNING, logger="services.security"):
        # revoking one key while a typo sits on another line: the typo is skipped, the revocation applies
        path.write_text("kept-key\nnew key with spaces\nnewer-key\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert not keys.check("revoked-key") and keys.check("kept-key") and keys.check("newer-key")
        assert "line 2 skipped" in caplog.text and "new key with" not in caplog.text
        path.unlink()  # a deleted key file: no key of it is valid any more
        assert not keys.check("kept-key") and not keys.check("newer-key") and len(keys) == 0
        assert "no key of it is accepted" in caplog.text
        path.write_text("back-key\n")
        assert keys.check("back-key")  # and when it is back, its keys are
    started = tmp_path / "bad"
    started.write_text("a b\ngood-key\n")
    assert ApiKeys([], str(started)).check("good-key")  # at start too: the bad line is skipped
    with pytest.raises(UserError, match="cannot read"):
        ApiKeys([], str(tmp_path / "absent"))  # at start, a missing file is a mistake to report
    with pytest.raises(UserError, match="--api-key-file is empty"):
        ApiKeys([], "")
    cli = subprocess.run([sys.executable, "-m", "apar.cli", "serve", "--model", "x", "--api-key-file", ""],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert cli.returncode == 2 and "--api-key-file is empty" in cli.stderr


def test_no_secret_on_a_command_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "apar.cli", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)

    for args in (("serve", "--model", "x", "--api-key", KEYS[0]), ("router", "--model", "x", "--workers", "h:1",
                                                                    "--api-key", KEYS[0]),
                 ("generate", "--server", "h:1", "--prompt", "p", "--api-key", KEYS[0])):
        out = run(*args)
        assert out.returncode == 2 and "command line is readable" in out.stderr and "--api-key-file" in out.stderr
    out = run("kvmanager", "--redis", "redis://:Pw-sentinel-77@127.0.0.1:1/0")
    assert out.returncode == 2 and "holds a password" in out.stderr and "Pw-sentinel" not in out.stderr
    assert "--redis-password-file" in out.stderr


def test_tls_flags_must_come_together(pki):
    with pytest.raises(UserError, match="--tls-key missing"):
        TLSFiles.load(pki.server.cert, None)
    with pytest.raises(UserError, match="--internal-tls-ca missing"):
        TLSFiles.load(pki.server.cert, pki.server.key, flags="--internal-tls", need_ca=True)
    with pytest.raises(UserError, match="not a PEM"):
        TLSFiles.load(__file__, pki.server.key)
    with pytest.raises(UserError, match="does not match"):
        TLSFiles.load(pki.server.cert, pki.rogue_server.key)
    with pytest.raises(UserError, match="not a CA certificate"):
        TLSFiles.load(pki.server.cert, pki.server.key, pki.server.key, need_ca=True)
    assert TLSFiles.load(None, None) is None
    tls = TLSFiles.load(pki.internal.cert, pki.internal.key, pki.internal.ca, "apar-internal", need_ca=True)
    assert tls.mutual and "BEGIN" not in repr(tls)  # the key never shows in a repr


def test_guard_limits_and_one_log_line_each(caplog):
    guard = Guard(ApiKeys(["the-key"]), Limits(max_streams_per_key=2, rate=2.0, burst=3, max_tokens=10,
                                               max_prompt_tokens=5))
    with caplog.at_level(logging.WARNING, logger="services.router.guard"):
        assert guard.authenticate(None, "grpc", "m") is None
        assert guard.authenticate("Bearer nope", "http", "m") is None
        caller = guard.authenticate("Bearer the-key", "http", "m")
        assert (caller.key, caller.door) == (key_id("the-key"), "http")
        t1, t2 = guard.admit(caller), guard.admit(caller)
        with pytest.raises(Refused) as err:
            guard.admit(caller)
        assert err.value.reason == "too_many_streams" and err.value.status == "exhausted"
        t1.release()
        t1.release()  # idempotent
        t3 = guard.admit(caller)  # the third token of the burst
        with pytest.raises(Refused) as err:
            guard.admit(caller)
        assert err.value.reason == "rate_limited" and err.value.retry_after_s >= 1
        other = Caller("other", "grpc")
        guard.admit(other).release()  # buckets and counts are per key
        for t in (t2, t3):
            t.release()
        assert guard.streams(caller.key) == 0
        with pytest.raises(Refused, match="max_tokens 11"):
            guard.check_max_tokens(caller, 11)
        with pytest.raises(Refused, match="prompt of 6 tokens"):
            guard.check_prompt_tokens(caller, 6, "prompt")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and all(line.startswith("refused request: reason=") for line in lines)
    assert "the-key" not in caplog.text and "nope" not in caplog.text
    assert f"key={key_id('the-key')}" in caplog.text and "key=none" in caplog.text
    dropped = guard.admit(other)
    assert guard.streams("other") == 1
    del dropped  # a ticket dropped unreleased gives its place back
    assert guard.streams("other") == 0


def test_each_of_n_answers_counts_toward_the_stream_limit():
    guard = Guard(ApiKeys(["the-key"]), Limits(max_streams_per_key=4))
    caller = guard.authenticate("Bearer the-key", "grpc", "m")
    three = guard.admit(caller, 3)
    assert guard.streams(caller.key) == 3
    with pytest.raises(Refused, match="3 running, this request asks for 2"):
        guard.admit(caller, 2)
    one = guard.admit(caller, 1)
    three.release()
    assert guard.streams(caller.key) == 1
    with pytest.raises(Refused):
        guard.admit(caller, 5)  # more answers than the limit: never
    one.release()
    assert guard.streams(caller.key) == 0


def test_max_threads_and_max_depth_are_bounded_on_both_apis():
    from services.protocol.wire import params_from_pb
    from services.router.openai_request import ApiError, read_params

    for field, value in (("max_threads", 1025), ("max_threads", 2**32 - 1), ("max_depth", 1025),
                         ("max_depth", 2**32 - 1), ("max_threads", 0)):
        with pytest.raises(UserError, match=field):
            params_from_pb(pb.common_pb2.SamplingParameters(), pb.common_pb2.Limits(**{field: value}), False)
        with pytest.raises(ApiError, match=field):
            read_params({"apar": {field: value}}, chat=False)
    params = params_from_pb(pb.common_pb2.SamplingParameters(), pb.common_pb2.Limits(max_threads=1024, max_depth=1024),
                            False)
    assert (params.max_threads, params.max_depth) == (1024, 1024)


def test_prefix_cache_salts_differ_per_key_unless_shared():
    from apar.engine.prefix import block_hashes

    isolated, shared = Guard(ApiKeys(["key-a", "key-b"])), Guard(ApiKeys(["key-a", "key-b"]), shared_prefix_cache=True)
    a, b = (isolated.authenticate(f"Bearer {k}", "http", "m") for k in ("key-a", "key-b"))
    assert a.cache_salt and b.cache_salt and a.cache_salt != b.cache_salt
    assert isolated.authenticate("Bearer key-a", "grpc", "m").cache_salt == a.cache_salt  # stable per key
    assert {shared.authenticate(f"Bearer {k}", "http", "m").cache_salt for k in ("key-a", "key-b")} == {0}
    assert Guard().authenticate(None, "http", "m").cache_salt == 0  # no keys: one shared cache
    ids = list(range(64))
    plain, salted_a, salted_b = (block_hashes(ids, 16, salt=s) for s in (0, a.cache_salt, b.cache_salt))
    assert plain == block_hashes(ids, 16) and len({*plain, *salted_a, *salted_b}) == 12  # no name shared
