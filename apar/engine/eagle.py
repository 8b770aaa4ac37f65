"""An EAGLE-style drafter: one small decoder layer that reads a thread's past (docs/design.md,
"Speculation"; trained by `apar train-medusa --kind eagle`, apar/train/eagle.py).

The hydra heads (apar/engine/medusa.py) see only the last hidden state and the tokens they guess; a
thread's earlier positions reach them only through what that one state holds. Here each position of a
thread gives the layer a pair (f_i, y_i): the model's final hidden state there and the token it gave.
The layer reads x_i = W_in [f_i; e(y_i)] (e the model's own frozen input embedding), attends causally
over the x's of the thread's earlier positions (its own keys and values, RoPE by position), and its
output is a guess at f_{i+1}: the model's LM head on it guesses y_{i+1}, the token after the pending
one. To guess further, the guess and its token are fed back as the next position's pair (as EAGLE
does): draft token k comes from k passes of one row per thread.

Per thread the drafter keeps the keys and values of the pairs it has seen (`_Cache`), by position, so
each step adds only the new positions: the rows of the step's verified run, which the engine hands
every drafter (`ByThread.propose`, apar/engine/medusa.py). A position seen again (a run rolled back, a thread recomputed after
preemption) replaces what was kept from there on; a gap starts the cache afresh. A cache covers the
thread's decoded positions only (not the prompt, not its parent's): training reads the same
(apar/train/medusa_data.py, `read_answers`). Caches not touched for `IDLE_STEPS` steps are dropped
(their thread ended; a thread that waited that long only drafts worse for a while).

Everything it guesses is verified, so a wrong guess costs speed, never output.
"""
from __future__ import annotations

from typing import Sequence

import torch

from apar.engine.errors import UserError
from apar.engine.medusa import ByThread

IDLE_STEPS = 512
EPS = 1e-6
# the chain stops at the first token below this probability: the layer is surer of its guesses than the
# hydra heads, and past 0.5 its extra drafts hold rarely (docs/benchmarks.md, "EAGLE drafts")
MIN_CONFIDENCE = 0.5


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS).to(x.dtype) * w


def _rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x: [..., N, A, D] rotated by position pos [..., N] (rotate-half form)."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))  # [D/2]
    ang = pos.to(torch.float32)[..., None] * inv  # [..., N, D/2]
    cos, sin = ang.cos().to(x.dtype)[..., None, :], ang.sin().to(x.dtype)[..., None, :]  # [..., N, 1, D/2]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class EagleHeads(torch.nn.Module):
    """The layer (the module's docstring): [f; e] -> x, pre-norm attention and a SiLU-gated MLP, both
    residual. `num_heads` is K, how many tokens it may guess; `attn_heads` its attention heads."""

    kind = "eagle"

    def __init__(self, hidden: int, num_heads: int, attn_heads: int = 8, intermediate: int | None = None) -> None:
        super().__init__()
        if hidden % attn_heads or (hidden // attn_heads) % 2:
            raise UserError(f"eagle heads: hidden size {hidden} does not split into {attn_heads} even heads")
        self.hidden, self.num_heads, self.attn_heads = hidden, num_heads, attn_heads
        self.head_dim = hidden // attn_heads
        self.intermediate = intermediate or 2 * hidden
        self.fc = torch.nn.Linear(2 * hidden, hidden)
        with torch.no_grad():  # start near "the next state is this one": x = f
            self.fc.weight.mul_(0.1)
            self.fc.weight[:, :hidden] += torch.eye(hidden)
            self.fc.bias.zero_()
        self.norm1 = torch.nn.Parameter(torch.ones(hidden))
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.norm2 = torch.nn.Parameter(torch.ones(hidden))
        self.gate_up = torch.nn.Linear(hidden, 2 * self.intermediate, bias=False)
        self.down = torch.nn.Linear(self.intermediate, hidden, bias=False)
        with torch.no_grad():  # the residual branches start small
            self.o.weight.mul_(0.1)
            self.down.weight.mul_(0.1)

    def config(self) -> dict:
        return {"kind": self.kind, "num_heads": self.num_heads, "hidden_size": self.hidden,
                "attn_heads": self.attn_heads, "intermediate": self.intermediate}

    # ---- the pieces, for any leading shape ----
    def inputs(self, f: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """[..., H] feature and token embedding -> x [..., H]."""
        return self.fc(torch.cat([f, e], dim=-1))

    def project(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., N, H], pos [..., N] -> q, k, v [..., N, A, D] (q and k rotated)."""
        q, k, v = self.qkv(_rms(x, self.norm1)).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.attn_heads, self.head_dim)
        return _rope(q.reshape(shape), pos), _rope(k.reshape(shape), pos), v.reshape(shape)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [..., H] and its attention output [..., A, D] -> the guessed feature [..., H]."""
        y = x + self.o(attn.reshape(*attn.shape[:-2], self.hidden))
        g, u = self.gate_up(_rms(y, self.norm2)).chunk(2, dim=-1)
        return y + self.down(torch.nn.functional.silu(g) * u)

    # ---- training: whole threads at once ----
    def unrolled(self, f: torch.Tensor, e: torch.Tensor, valid: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Teacher-forced tokens, fed-back features, as drafting runs them. f [B, L, H] the model's
        features, e [B, L, H] the embeddings of the tokens they gave, valid [B, L]. Returns per depth d
        (1..depth) the guesses [B, L, H]: at depth 1 index j guesses f_{j+1} from the true pairs up to j;
        at depth d > 1 index j reads the guess of depth d - 1 at j - 1 with the true token y_j, and attends
        to the true pairs up to j - d + 1 and to the depth-m rows (1 < m < d) at j - d + m."""
        B, L, _ = f.shape
        pos = torch.arange(L, device=f.device).expand(B, L)
        x = self.inputs(f, e)
        q, k, v = self.project(x, pos)  # [B, L, A, D]
        scale = self.head_dim ** -0.5
        idx = torch.arange(L, device=f.device)
        outs, extra = [], []  # extra: per depth m > 1, its (k, v) [B, L, A, D]
        for d in range(1, depth + 1):
            if d > 1:
                prev = torch.cat([torch.zeros_like(outs[-1][:, :1]), outs[-1][:, :-1]], dim=1)  # guess at j - 1
                x = self.inputs(prev, e)
                q, kd, vd = self.project(x, pos)
                extra.append((kd, vd))
            s = torch.einsum("bqad,bkad->baqk", q, k) * scale  # [B, A, L, L] to the true pairs
            mask = (idx[None, :] <= idx[:, None] - (d - 1)) & valid[:, None, None, :]  # [B, 1, L, L]
            s = s.masked_fill(~mask, float("-inf"))
            # the fed-back rows: depth m at index j - d + m (shift d - m), one score each
            side = []
            for m, (km, vm) in enumerate(extra, start=2):
                shift = d - m
                ks = torch.cat([torch.zeros_like(km[:, :shift]), km[:, : L - shift]], dim=1) if shift else km
                vs = torch.cat([torch.zeros_like(vm[:, :shift]), vm[:, : L - shift]], dim=1) if shift else vm
                sc = (q * ks).sum(-1).transpose(1, 2)[..., None] * scale  # [B, A, L, 1]
                ok = (idx >= shift)[None, None, :, None]
                side.append((sc.masked_fill(~ok, float("-inf")), vs))
            allsc = torch.cat([s, *[sc for sc, _ in side]], dim=-1)  # [B, A, L, L + d - 1]
            p = torch.nan_to_num(allsc.softmax(dim=-1))
            attn = torch.einsum("baqk,bkad->bqad", p[..., :L], v)
            for i, (_, vs) in enumerate(side):
                attn = attn + p[..., L + i].transpose(1, 2)[..., None] * vs
            outs.append(self.finish(x, attn))
        return outs


class _Cache:
    """One thread's keys and values [n, A, D] from position `first` on."""

    __slots__ = ("first", "k", "v", "touched")

    def __init__(self, first: int, k: torch.Tensor, v: torch.Tensor, step: int) -> None:
        self.first, self.k, self.v, self.touched = first, k, v, step

    def put(self, first: int, k: torch.Tensor, v: torch.Tensor, step: int) -> None:
        """Positions first.. get k, v; whatever was kept from `first` on is replaced."""
        end = self.first + self.k.shape[0]
        if first < self.first or first > end:  # before what it holds, or a gap: start afresh
            self.first, self.k, self.v = first, k, v
        else:
            cut = first - self.first
            self.k, self.v = torch.cat([self.k[:cut], k]), torch.cat([self.v[:cut], v])
        self.touched = step


class EagleDrafter(ByThread):
    """Guesses from the layer, kept per thread (the module's docstring; `propose`, `proposal` and
    `scores` as every `ByThread` drafter)."""

    def __init__(self, heads: EagleHeads, lm_weight: torch.Tensor, vocab: torch.Tensor | None,
                 stop_ids: Sequence[int], embed: torch.Tensor, dtype: torch.dtype | None = None,
                 min_confidence: float = MIN_CONFIDENCE) -> None:
        import copy

        device, dtype = lm_weight.device, dtype or lm_weight.dtype
        if heads.hidden != lm_weight.shape[1]:
            raise UserError(f"the eagle heads are for hidden size {heads.hidden}, the model's is {lm_weight.shape[1]}")
        if vocab is not None and (vocab.numel() == 0 or int(vocab.max()) >= lm_weight.shape[0] or int(vocab.min()) < 0):
            raise UserError("the eagle heads' vocabulary does not fit the model's")
        self.heads = copy.deepcopy(heads).to(device=device, dtype=dtype).eval()
        self.num_heads = heads.num_heads
        self.vocab = None if vocab is None else vocab.to(device)
        self.table = (lm_weight.detach() if vocab is None else lm_weight.detach().index_select(0, self.vocab)).to(dtype)
        self.embed = embed.detach()
        self.stop_ids = frozenset(stop_ids)
        self.min_confidence = min_confidence
        self.caches: dict[tuple[str, int], _Cache] = {}
        self.steps = 0
        self.proposals: dict[tuple[str, int], tuple[int, list[int], list[float]]] = {}

    def _e(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens].to(self.table.dtype)

    def chain_seconds(self, threads: int = 4, past: int = 32, repeats: int = 3) -> float:
        """The best of `repeats` timings of a step's work for `threads` threads with `past` positions
        kept (after one untimed), on random rows; the caches are left as they were."""
        import time

        kept, proposals = self.caches, self.proposals
        best = float("inf")
        try:
            for i in range(repeats + 1):
                self.caches = {}
                keys = [("timing", j) for j in range(threads)]
                h = torch.randn(threads * past, self.heads.hidden, device=self.table.device)
                toks = torch.zeros(threads * past, dtype=torch.long, device=self.table.device)
                self._observe(keys, [past + 1] * threads, h, toks.tolist(), [past] * threads)
                start = time.perf_counter()
                self._observe(keys, [past + 2] * threads, h[:threads], [0] * threads, [1] * threads)
                self.chain(keys, cut=True)
                if i:
                    best = min(best, time.perf_counter() - start)
        finally:
            self.caches, self.proposals = kept, proposals
        return best

    @torch.inference_mode()
    def _observe(self, keys: list[tuple[str, int]], lengths: list[int], hidden: torch.Tensor,
                 tokens: list[int], counts: list[int]) -> None:
        """Each thread's new pairs into its cache: thread i's counts[i] rows of `hidden` (in order) and
        the tokens they gave, the last at position lengths[i] - 1."""
        self.steps += 1
        if not keys:
            return
        dev = self.table.device
        pos = torch.tensor([lengths[i] - counts[i] + j for i in range(len(keys)) for j in range(counts[i])],
                           device=dev)
        x = self.heads.inputs(hidden.to(self.table.dtype), self._e(torch.tensor(tokens, device=dev)))
        _, k, v = self.heads.project(x, pos)  # [N, A, D]
        at = 0
        for key, length, n in zip(keys, lengths, counts):
            first = length - n
            c = self.caches.get(key)
            if c is None:
                self.caches[key] = _Cache(first, k[at: at + n], v[at: at + n], self.steps)
            else:
                c.put(first, k[at: at + n], v[at: at + n], self.steps)
            at += n
        self._last = (x, pos, [sum(counts[: i + 1]) - 1 for i in range(len(keys))])
        if self.steps % 64 == 0:
            for key in [key for key, c in self.caches.items() if self.steps - c.touched > IDLE_STEPS]:
                del self.caches[key]

    @torch.inference_mode()
    def chain(self, keys: list[tuple[str, int]], cut: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The guesses after each thread's last observed pair (the `_observe` just made): (tokens [M, K],
        each token's probability [M, K]). With `cut`, stops once no thread is sure of its last token
        (later tokens then read probability 0)."""
        x_all, pos_all, last = self._last
        rows = torch.tensor(last, device=x_all.device)
        x, pos = x_all.index_select(0, rows), pos_all.index_select(0, rows)  # [M, H], [M]
        caches = [self.caches[key] for key in keys]
        lens = torch.tensor([c.k.shape[0] for c in caches], device=x.device)
        K = torch.nn.utils.rnn.pad_sequence([c.k for c in caches], batch_first=True)  # [M, T, A, D]
        V = torch.nn.utils.rnn.pad_sequence([c.v for c in caches], batch_first=True)
        T = K.shape[1]
        valid = torch.arange(T, device=x.device)[None, :] < lens[:, None]  # [M, T]
        scale = self.heads.head_dim ** -0.5
        ks, vs = [], []  # the fed-back rows so far (depth > 1)
        toks, confs = [], []
        sure = torch.ones(len(keys), dtype=torch.bool, device=x.device)
        for d in range(self.num_heads):
            q, kd, vd = self.heads.project(x[:, None], pos[:, None])  # [M, 1, A, D]
            q, kd, vd = q[:, 0], kd[:, 0], vd[:, 0]
            if d:
                ks.append(kd)
                vs.append(vd)
            s = torch.einsum("mad,mtad->mat", q, K) * scale  # [M, A, T]
            s = s.masked_fill(~valid[:, None, :], float("-inf"))
            if ks:
                s = torch.cat([s, torch.stack([(q * kk).sum(-1) for kk in ks], dim=-1) * scale], dim=-1)
            p = s.float().softmax(dim=-1).to(q.dtype)
            attn = torch.einsum("mat,mtad->mad", p[..., :T], V)
            for i, vv in enumerate(vs):
                attn = attn + p[..., T + i, None] * vv
            f = self.heads.finish(x, attn)  # [M, H] the guess at the next position's feature
            conf, idx = self._logits(f).float().softmax(dim=-1).max(dim=-1)
            tok = self._local(idx)
            toks.append(tok)
            confs.append(conf)
            sure &= conf >= self.min_confidence
            if d + 1 == self.num_heads:
                break
            if cut and not bool(sure.any()):
                toks.extend([tok] * (self.num_heads - d - 1))
                confs.extend([torch.zeros_like(conf)] * (self.num_heads - d - 1))
                break
            x = self.heads.inputs(f, self._e(tok))
            pos = pos + 1
        return torch.stack(toks, dim=1), torch.stack(confs, dim=1)

    def skip(self, keys: list[tuple[str, int]], lengths: list[int], hidden: torch.Tensor | None,
             tokens: list[int], counts: list[int]) -> None:
        """A step without guesses (`ByThread.skip`): the pairs still go into the threads' caches, so the
        guesses resume over the whole past."""
        self.proposals = {}
        if keys:
            self._observe(keys, lengths, hidden, tokens, counts)
        else:
            self.steps += 1

    def propose(self, keys: list[tuple[str, int]], lengths: list[int], hidden: torch.Tensor | None,
                tokens: list[int], counts: list[int]) -> None:
        """Replace the guesses by those of this step (`ByThread`): every row of each verified run goes
        into its thread's cache, then the chain runs from each thread's last pair."""
        if not keys:
            self.proposals = {}
            self.steps += 1
            return
        self._observe(keys, lengths, hidden, tokens, counts)
        self._keep(keys, lengths, *self.chain(keys, cut=True))
