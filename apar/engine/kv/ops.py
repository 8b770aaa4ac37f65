"""Ledger operations as data: what a worker's steps are made of, applied the same way on both sides.

The worker's engine hands its KV backend, per step, the ops in plan order (`Start`, `Fork`, `Append`),
and between steps the thread ends (`Finish`, `Release`, answers' `Fork`s) and the rejected drafts'
`Truncate`s. `step.apply` runs ops on a
ledger and answers with the slots of each append and every block id freed; the worker's own ledger and the KV
manager's replica both go through it, so they give the same answer for the same ops.

Each op is one class, the one place that says everything about it: its JSON form (`to_json`,
`from_json`, how a worker's steps travel and the store logs them), what a client may send of it
(`check`), what it does to a ledger (`apply_to`) and which threads it touches (`touches`, for
`record`). `OPS` maps JSON codes to classes: a new op is one class added there.

`apply` and `record` (step.py) run a step's ops on a ledger.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from apar.engine.kv.ledger import KVLedger, OutOfBlocks, ThreadRef

if TYPE_CHECKING:
    from apar.engine.kv.step import OpResults

MAX_REQUEST_CHARS = 256  # a request id, in an op
MAX_THREAD = (1 << 32) - 1
MAX_APPEND_TOKENS = 1 << 20  # one append (a prefill chunk); more than the pool holds answers "failed"
MAX_NAMES = 1 << 16  # block names in one Reuse or Name (a prompt of a million tokens at block size 16)


def check_request_id(request, what: str = "request") -> str:
    """ValueError unless `request` is a request id a worker could send."""
    if type(request) is not str:
        raise ValueError(f"{what} id must be a string, got {request!r}")
    if not request:
        raise ValueError(f"{what} id is empty")
    if len(request) > MAX_REQUEST_CHARS:
        raise ValueError(f"{what} id is longer than {MAX_REQUEST_CHARS} characters")
    return request


_new = tuple.__new__  # a checked ThreadRef made without the NamedTuple's Python-level __new__


def _ref(request, thread, what: str) -> ThreadRef:
    """A thread as an op names it (request string, thread number); ValueError for anything else. (A
    replica reads thousands a second: the checks pass in one expression, and are made one by one only to
    say which failed.)"""
    if (type(request) is str and 0 < len(request) <= MAX_REQUEST_CHARS and type(thread) is int
            and 0 <= thread <= MAX_THREAD):
        return _new(ThreadRef, (request, thread))
    check_request_id(request, f"{what} request")
    raise ValueError(f"{what} thread must be a number 0..2^32-1, got {thread!r}")


def _refs(items: list, what: str) -> tuple[ThreadRef, ...]:
    """`[[request, thread], ...]` as ThreadRefs; ValueError naming the first that is not one."""
    for x in items:
        if type(x) is not list or len(x) != 2:
            raise ValueError(f"{what} takes a list of [request, thread], got {x!r}")
    return tuple([_ref(r, t, what) for r, t in items])


def _names(names, what: str) -> tuple[int, ...]:
    """Block names (apar/engine/prefix.py: unsigned 64-bit); ValueError for anything else."""
    if type(names) not in (list, tuple) or len(names) > MAX_NAMES:
        raise ValueError(f"{what}: a list of at most {MAX_NAMES} block names")
    if any(type(n) is not int or not 0 <= n < 1 << 64 for n in names):
        raise ValueError(f"{what}: block names are unsigned 64-bit numbers")
    return tuple(names)


class _Op:
    """What every op class defines (see the module's docstring)."""

    __slots__ = ()
    code: ClassVar[str]  # its JSON form's first item
    arity: ClassVar[int]  # its JSON form's length

    def to_json(self) -> list:
        raise NotImplementedError

    @classmethod
    def from_json(cls, item: list):
        """The op a JSON list names (`item[0] == cls.code`, `len(item) == cls.arity`); ValueError if the
        values are not ones a worker sends."""
        raise NotImplementedError

    def check(self) -> None:
        """ValueError unless a worker could send this op (ids and counts within their limits)."""
        raise NotImplementedError

    def apply_to(self, ledger: KVLedger, answer: OpResults, starved: set[str], slots: bool) -> None:
        """Change the ledger (LedgerError if it refuses); see `apply` for `starved` and `slots`."""
        raise NotImplementedError

    def touches(self) -> tuple[ThreadRef, ...]:
        """The threads whose blocks this op changes besides appending to them (`record` folds no
        later one-token append of theirs into the step's Advance)."""
        return ()


@dataclass(slots=True)
class Start(_Op):
    """A root thread begins (no context yet; its prompt comes by `Append`)."""

    thread: ThreadRef
    code: ClassVar[str] = "s"
    arity: ClassVar[int] = 3

    def to_json(self) -> list:
        return ["s", self.thread.request, self.thread.thread]

    @classmethod
    def from_json(cls, item: list) -> Start:
        return cls(_ref(item[1], item[2], "start"))

    def check(self) -> None:
        _ref(*self.thread, "start")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        ledger.start(self.thread)

    def touches(self) -> tuple[ThreadRef, ...]:
        return (self.thread,)


@dataclass(slots=True)
class Append(_Op):
    """`tokens` new tokens of a thread get their slots (opening blocks as needed)."""

    thread: ThreadRef
    tokens: int
    code: ClassVar[str] = "a"
    arity: ClassVar[int] = 4

    def to_json(self) -> list:
        return ["a", self.thread.request, self.thread.thread, self.tokens]

    @classmethod
    def from_json(cls, item: list) -> Append:
        op = cls(_ref(item[1], item[2], "append"), item[3])
        op._check_tokens()
        return op

    def check(self) -> None:
        _ref(*self.thread, "append")
        self._check_tokens()

    def _check_tokens(self) -> None:
        if type(self.tokens) is not int or not 1 <= self.tokens <= MAX_APPEND_TOKENS:
            raise ValueError(f"append of {self.tokens!r} tokens; must be 1..{MAX_APPEND_TOKENS}")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        if self.thread.request in starved:
            answer.appends.append(None)
            return
        try:
            answer.appends.append(ledger.append(self.thread, self.tokens, slots))
        except OutOfBlocks:
            starved.add(self.thread.request)
            answer.appends.append(None)


@dataclass(slots=True)
class Fork(_Op):
    """`child` begins, reading all of `parent`'s context so far (`KVLedger.fork`)."""

    parent: ThreadRef
    child: ThreadRef
    code: ClassVar[str] = "f"
    arity: ClassVar[int] = 5

    def to_json(self) -> list:
        return ["f", self.parent.request, self.parent.thread, self.child.request, self.child.thread]

    @classmethod
    def from_json(cls, item: list) -> Fork:
        return cls(_ref(item[1], item[2], "fork parent"), _ref(item[3], item[4], "fork child"))

    def check(self) -> None:
        _ref(*self.parent, "fork parent")
        _ref(*self.child, "fork child")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        if self.parent.request not in starved:
            ledger.fork(self.parent, self.child)

    def touches(self) -> tuple[ThreadRef, ...]:
        return (self.parent, self.child)


@dataclass(slots=True)
class Finish(_Op):
    """A thread ends: its blocks are released as nothing reads them any more."""

    thread: ThreadRef
    code: ClassVar[str] = "x"
    arity: ClassVar[int] = 3

    def to_json(self) -> list:
        return ["x", self.thread.request, self.thread.thread]

    @classmethod
    def from_json(cls, item: list) -> Finish:
        return cls(_ref(item[1], item[2], "finish"))

    def check(self) -> None:
        _ref(*self.thread, "finish")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        answer.freed.extend(ledger.finish(self.thread))

    def touches(self) -> tuple[ThreadRef, ...]:
        return (self.thread,)


@dataclass(slots=True)
class Release(_Op):
    """A request ends (done, cancelled or failed): every thread of it, and the request is forgotten."""

    request: str
    code: ClassVar[str] = "r"
    arity: ClassVar[int] = 2

    def to_json(self) -> list:
        return ["r", self.request]

    @classmethod
    def from_json(cls, item: list) -> Release:
        return cls(check_request_id(item[1], "release"))

    def check(self) -> None:
        check_request_id(self.request, "release")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        answer.freed.extend(ledger.release(self.request))


@dataclass(slots=True)
class Truncate(_Op):
    """The thread's last `tokens` slots are taken back (`KVLedger.truncate`): the rejected positions of
    a verified draft (apar/engine/speculate.py). The engine sends it deferred, like a thread end, so it
    travels at the head of the next step's message: still one message per engine step."""

    thread: ThreadRef
    tokens: int
    code: ClassVar[str] = "t"
    arity: ClassVar[int] = 4

    def to_json(self) -> list:
        return ["t", self.thread.request, self.thread.thread, self.tokens]

    @classmethod
    def from_json(cls, item: list) -> Truncate:
        op = cls(_ref(item[1], item[2], "truncate"), item[3])
        op._check_tokens()
        return op

    def check(self) -> None:
        _ref(*self.thread, "truncate")
        self._check_tokens()

    def _check_tokens(self) -> None:
        if type(self.tokens) is not int or not 1 <= self.tokens <= MAX_APPEND_TOKENS:
            raise ValueError(f"truncate of {self.tokens!r} tokens; must be 1..{MAX_APPEND_TOKENS}")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        if self.thread.request not in starved:
            answer.freed.extend(ledger.truncate(self.thread, self.tokens))

    def touches(self) -> tuple[ThreadRef, ...]:
        return (self.thread,)


@dataclass(slots=True)
class Advance(_Op):
    """One token for every open thread (`KVLedger.open_threads`) except `held`: `KVLedger.advance`."""

    held: frozenset[ThreadRef] = frozenset()
    code: ClassVar[str] = "v"
    arity: ClassVar[int] = 2

    def to_json(self) -> list:
        return ["v", sorted([r.request, r.thread] for r in self.held)]

    @classmethod
    def from_json(cls, item: list) -> Advance:
        held = item[1]
        if held == []:  # the decode step's usual case
            return _ADVANCE_ALL
        if type(held) is not list:
            raise ValueError(f"advance holds a list of [request, thread]: {item!r}")
        return cls(frozenset(_refs(held, "advance held")))

    def check(self) -> None:
        for ref in self.held:
            _ref(*ref, "advance held")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        ledger.advance(self.held)


_ADVANCE_ALL = Advance()  # every open thread advances (ops are never changed once made: one can be shared)


@dataclass(slots=True)
class AppendEach(_Op):
    """One token for each of these threads, in order: the same as `Append(t, 1)` for each. A compact step
    carries the decode tokens that open a block this way (`record`), one short list instead of an op per
    thread: a replica reads them in a tight loop."""

    threads: tuple[ThreadRef, ...]
    code: ClassVar[str] = "e"
    arity: ClassVar[int] = 2

    def to_json(self) -> list:
        return ["e", [[r.request, r.thread] for r in self.threads]]

    @classmethod
    def from_json(cls, item: list) -> AppendEach:
        refs = item[1]
        if type(refs) is not list or len(refs) > MAX_NAMES:
            raise ValueError(f"append-each takes a list of at most {MAX_NAMES} [request, thread]")
        return cls(_refs(refs, "append-each"))

    def check(self) -> None:
        if len(self.threads) > MAX_NAMES:
            raise ValueError(f"append-each of more than {MAX_NAMES} threads")
        for ref in self.threads:
            _ref(*ref, "append-each")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        answer.appends.extend(ledger.append_each(self.threads, starved, slots))

    def touches(self) -> tuple[ThreadRef, ...]:
        return self.threads


@dataclass(slots=True)
class Reuse(_Op):
    """A root just started begins its context with the cached blocks of these names (`KVLedger.reuse`)."""

    thread: ThreadRef
    names: tuple[int, ...]
    code: ClassVar[str] = "u"
    arity: ClassVar[int] = 4

    def to_json(self) -> list:
        return ["u", self.thread.request, self.thread.thread, list(self.names)]

    @classmethod
    def from_json(cls, item: list) -> Reuse:
        return cls(_ref(item[1], item[2], "reuse"), _names(item[3], "reuse"))

    def check(self) -> None:
        _ref(*self.thread, "reuse")
        _names(self.names, "reuse")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        ledger.reuse(self.thread, self.names)

    def touches(self) -> tuple[ThreadRef, ...]:
        return (self.thread,)


@dataclass(slots=True)
class Name(_Op):
    """The thread's context blocks `first ..` (full, its own) get these prefix names (`KVLedger.name`)."""

    thread: ThreadRef
    first: int
    names: tuple[int, ...]
    code: ClassVar[str] = "n"
    arity: ClassVar[int] = 5

    def to_json(self) -> list:
        return ["n", self.thread.request, self.thread.thread, self.first, list(self.names)]

    @classmethod
    def from_json(cls, item: list) -> Name:
        op = cls(_ref(item[1], item[2], "name"), item[3], _names(item[4], "name"))
        op._check_first()
        return op

    def check(self) -> None:
        _ref(*self.thread, "name")
        _names(self.names, "name")
        self._check_first()

    def _check_first(self) -> None:
        if type(self.first) is not int or not 0 <= self.first < MAX_APPEND_TOKENS:
            raise ValueError(f"name: first block must be a number 0..{MAX_APPEND_TOKENS - 1}")

    def apply_to(self, ledger, answer, starved, slots) -> None:
        ledger.name(self.thread, self.first, self.names)

    def touches(self) -> tuple[ThreadRef, ...]:
        return (self.thread,)


Op = Start | Append | Fork | Finish | Release | Advance | AppendEach | Reuse | Name | Truncate
OPS: dict[str, type[Op]] = {cls.code: cls for cls in (Start, Append, Fork, Finish, Release, Advance, AppendEach, Reuse,
                                                     Name, Truncate)}


def op_from_json(item) -> Op:
    """One op from its JSON form; ValueError for anything that is not one a worker could send."""
    if type(item) is not list or not item or type(item[0]) is not str:
        raise ValueError(f"not an op: {item!r}")
    cls = OPS.get(item[0])
    if cls is None or len(item) != cls.arity:
        raise ValueError(f"not an op: {item!r}")
    return cls.from_json(item)
