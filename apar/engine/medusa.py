"""Draft heads: K small heads on the model's last hidden state guess a thread's next K tokens
(docs/design.md, "Speculation"; trained by `apar train-medusa`, apar/train/medusa.py).

Two kinds of heads, named in `medusa.json` (`kind`; a third kind, `eagle`, is one decoder layer over the
thread's past, apar/engine/eagle.py, loaded through `MedusaDrafter.load` as well):
- `medusa`: head k (k = 1..K) maps the final (normed) hidden state h_t at a thread's position t to
  SiLU(W_k h_t + b_k) + h_t, which the model's own LM head turns into a guess at token t + k + 1 (the LM
  head on h_t itself gives token t + 1, the model's own next token). Head k does not know the tokens
  before its target.
- `hydra` (token-conditioned, as Hydra and EAGLE): a chain z_0 = h_t, z_k = z_{k-1} + SiLU(W_k [z_{k-1};
  e_k] + b_k), where e_k is the model's own (frozen) input embedding of the token just before head k's
  target: e_1 of the thread's pending token (known when the heads run: the model's token from h_t),
  e_k of head k-1's guess. The LM head on z_k is head k's guess. `blocks` is 1 (one block for every
  head, a recurrence) or K (a block per head).

The heads run in the same step as the forward that produced h_t, on the row each sampling thread's
next pending token came from (the sampled row, or the row of the last accepted draft token), so the
next step's draft is ready before it is planned.

Data flow, one step: the runner's LM head hook keeps the hidden rows it saw (`ModelRunner.keep_hidden`);
after verification `Speculation._propose` hands `MedusaDrafter.propose` each thread's verified run (its
rows and tokens, `ByThread`); the heads read the run's last row and its pending token, and the guesses
are kept per thread with the context length they follow;
`_plan_drafts` takes them (`proposal`) when the thread's context still has that length. A guess never
holds a control token (cut before the first), and any guess is verified, so wrong guesses cost speed,
never output.

A chain stops at the first head that is unsure of its token (`MIN_CONFIDENCE`): a wrong guess costs
positions of the step (its KV written, its logits row computed) and saves nothing.

The LM head of the guesses is restricted to the heads' vocabulary (the token ids saved with them, the
tokens of the data they were trained on) when present: a guess outside it would rarely be accepted,
and the product is then a fraction of the full vocabulary's.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from apar.engine.errors import UserError
from apar.engine import rows_gemm

# a guess is cut at the first head whose probability of its own token is below this (docs/benchmarks.md,
# "Speculation": acceptance and drafted tokens by confidence on SmolLM2-135M)
MIN_CONFIDENCE = 0.3
HEADS_FILE = "medusa_heads.safetensors"
CONFIG_FILE = "medusa.json"
KINDS = ("medusa", "hydra", "eagle")


class MedusaHeads(torch.nn.Module):
    """K residual blocks over the hidden state: [N, H] -> [N, K, H]. Zero weights make each head the
    identity (every head then guesses the model's own next token)."""

    kind = "medusa"

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.hidden, self.num_heads = hidden, num_heads
        self.weight = torch.nn.Parameter(torch.zeros(num_heads, hidden, hidden))  # [K, H_out, H_in]
        self.bias = torch.nn.Parameter(torch.zeros(num_heads, hidden))  # [K, H]

    def forward(self, h: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """h: [N, H] -> [N, K, H]; `inputs` (the hydra heads' tokens) is not read."""
        z = torch.einsum("nh,kgh->nkg", h, self.weight) + self.bias  # [N, K, H]
        return torch.nn.functional.silu(z) + h[:, None, :]

    def config(self) -> dict:
        return {"kind": self.kind, "num_heads": self.num_heads, "hidden_size": self.hidden}


class HydraHeads(torch.nn.Module):
    """The token-conditioned chain (the module's docstring): `blocks` residual blocks [2H] -> [H]. Zero
    weights make each head repeat the model's next token."""

    kind = "hydra"

    def __init__(self, hidden: int, num_heads: int, blocks: int | None = None) -> None:
        super().__init__()
        blocks = num_heads if blocks is None else blocks
        if blocks not in (1, num_heads):
            raise UserError(f"hydra heads have 1 block or one per head ({num_heads}), not {blocks}")
        self.hidden, self.num_heads, self.blocks = hidden, num_heads, blocks
        self.weight = torch.nn.Parameter(torch.zeros(blocks, hidden, 2 * hidden))  # [B, H_out, 2H_in]
        self.bias = torch.nn.Parameter(torch.zeros(blocks, hidden))  # [B, H]
        self.product = F.linear  # apar/engine/rows_gemm.py may route it through its kernel

    def step(self, k: int, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Head k + 1's state from head k's (z: [N, H]) and the embedding of its input token (e: [N, H])."""
        b = min(k, self.blocks - 1)
        x = torch.cat([z, e], dim=-1)  # [N, 2H]
        return z + F.silu(self.product(x, self.weight[b], self.bias[b]))

    def forward(self, h: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced chain: h [N, H], inputs [N, K, H] the embeddings of each head's input token ->
        [N, K, H] the states the LM head reads."""
        z, out = h, []
        for k in range(self.num_heads):
            z = self.step(k, z, inputs[:, k])
            out.append(z)
        return torch.stack(out, dim=1)

    def config(self) -> dict:
        return {"kind": self.kind, "num_heads": self.num_heads, "hidden_size": self.hidden, "blocks": self.blocks}


Heads = MedusaHeads | HydraHeads  # (and EagleHeads, apar/engine/eagle.py)


def make_heads(kind: str, hidden: int, num_heads: int, blocks: int | None = None, **extra) -> Heads:
    if kind == "medusa":
        return MedusaHeads(hidden, num_heads)
    if kind == "hydra":
        return HydraHeads(hidden, num_heads, blocks)
    if kind == "eagle":
        from apar.engine.eagle import EagleHeads

        return EagleHeads(hidden, num_heads, **extra)
    raise UserError(f"unknown kind of draft heads {kind!r} (one of {', '.join(KINDS)})")


def save_heads(out: Path, heads: Heads, vocab: Sequence[int] | None, meta: dict) -> None:
    """The heads' weights (and their vocabulary) in `out/medusa_heads.safetensors`, their kind, shape and
    how they were made in `out/medusa.json`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().contiguous() for name, t in heads.state_dict().items()}
    if vocab is not None:
        tensors["vocab"] = torch.tensor(sorted(set(vocab)), dtype=torch.int64)
    save_file(tensors, str(out / HEADS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({**heads.config(), **meta}, indent=2) + "\n")


def load_heads(directory: Path) -> tuple[Heads, torch.Tensor | None, dict]:
    """The heads saved in `directory` (and their vocabulary, or None); a clear error when there are none.
    A `medusa.json` without `kind` holds medusa heads."""
    from safetensors.torch import load_file

    weights, config = directory / HEADS_FILE, directory / CONFIG_FILE
    if not weights.is_file() or not config.is_file():
        raise UserError(f"--speculate medusa: {directory} has no {HEADS_FILE} and {CONFIG_FILE}; train them "
                        f"with `apar train-medusa {directory}`")
    try:
        meta = json.loads(config.read_text())
        tensors = load_file(str(weights))
        kind = meta.get("kind", "medusa")
        extra = {k: int(meta[k]) for k in ("attn_heads", "intermediate") if kind == "eagle" and k in meta}
        heads = make_heads(kind, int(meta["hidden_size"]), int(meta["num_heads"]), meta.get("blocks"), **extra)
        heads.load_state_dict({name: t for name, t in tensors.items() if name != "vocab"})
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load the medusa heads in {directory}: {exc}") from None
    return heads, tensors.get("vocab"), meta


class ByThread:
    """What every drafter that guesses per thread shares: its guesses of the last step, kept by thread
    with the context length they follow (`propose` replaces them, `proposal` and `scores` read them), and
    the cut of a chain of guesses. A subclass sets `vocab`, `stop_ids` and `min_confidence`.

    `propose(keys, lengths, hidden, tokens, counts)`, after every step: thread keys[i], whose context now
    has lengths[i] tokens, verified a run of counts[i] tokens; `hidden` [N, H] holds every run's rows in
    order (the row each token came from) and `tokens` [N] those tokens, a run's last its pending token."""

    by_thread = True  # drafts come from `proposal`, not from the context (`Drafter.draft`)
    vocab: torch.Tensor | None
    stop_ids: frozenset[int]
    min_confidence: float
    # thread -> (its context length, the guessed tokens after it, their scores)
    proposals: dict[tuple[str, int], tuple[int, list[int], list[float]]]

    table: torch.Tensor  # [V', H] the LM head's rows the drafter guesses among
    heads: torch.nn.Module
    product = staticmethod(F.linear)

    def use_rows_kernel(self) -> None:
        """Route the float32 CPU products (the drafter's layers, its LM head rows) through the kernel of
        apar/engine/rows_gemm.py, as the model's own."""
        if self.table.device.type == "cpu" and self.table.dtype == torch.float32 and rows_gemm.kernel() is not None:
            rows_gemm.use_rows_kernel(self.heads)
            self.product = rows_gemm.linear

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.table)

    def _local(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.vocab is None else self.vocab[idx]

    def _cut(self, idx: torch.Tensor, conf: torch.Tensor) -> list[tuple[list[int], list[float]]]:
        """Per row of a chain (idx [M, K] its tokens, conf [M, K] each token's own probability): its tokens
        up to the first below `min_confidence` or before a control token, each scored with the product of
        the probabilities up to it (apar/engine/draft_policy.py)."""
        keep = (conf >= self.min_confidence).int().cumprod(dim=-1).sum(dim=-1).tolist()  # [M]
        out = []
        for row, score, n in zip(idx.tolist(), conf.cumprod(dim=-1).tolist(), keep):
            cut = []
            for tok in row[:n]:
                if tok in self.stop_ids:
                    break
                cut.append(tok)
            out.append((cut, score[: len(cut)]))
        return out

    def _keep(self, keys: list[tuple[str, int]], lengths: list[int], idx: torch.Tensor, conf: torch.Tensor) -> None:
        """The step's guesses replace the last: thread keys[i], after its context of lengths[i] tokens."""
        self.proposals = {key: (length, *found) for key, length, found in zip(keys, lengths, self._cut(idx, conf))}

    def proposal(self, key: tuple[str, int], length: int, k: int) -> list[int]:
        """Up to k guessed tokens after the thread's context of `length` tokens; [] when none was made
        after exactly that context."""
        found = self.proposals.get(key)
        if found is None or found[0] != length or k <= 0:
            return []
        return found[1][:k]

    def scores(self, key: tuple[str, int], length: int, n: int) -> list[float]:
        """The scores of the first n tokens of `proposal(key, length, ...)`: the product of the chain's
        probabilities up to each."""
        return self.proposals[key][2][:n]

    def draft(self, context: Sequence[int], k: int) -> list[int]:  # the Drafter protocol: no thread, no guess
        return []

    def skip(self, keys: list[tuple[str, int]], lengths: list[int], hidden: torch.Tensor | None,
             tokens: list[int], counts: list[int]) -> None:
        """A step without guesses (apar/engine/draft_policy.py, `DraftGate`): as `propose`, but nothing is
        guessed; a drafter that keeps the threads' past (eagle) still takes it in."""
        self.proposals = {}


class MedusaDrafter(ByThread):
    """Guesses from the heads, kept per thread (the module's docstring)."""

    def __init__(self, heads: Heads, lm_weight: torch.Tensor, vocab: torch.Tensor | None,
                 stop_ids: Sequence[int], embed: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> None:
        device, dtype = lm_weight.device, dtype or lm_weight.dtype
        if heads.hidden != lm_weight.shape[1]:
            raise UserError(f"the medusa heads are for hidden size {heads.hidden}, the model's is {lm_weight.shape[1]}")
        if vocab is not None and (vocab.numel() == 0 or int(vocab.max()) >= lm_weight.shape[0] or int(vocab.min()) < 0):
            raise UserError("the medusa heads' vocabulary does not fit the model's")
        if heads.kind == "hydra" and embed is None:
            raise UserError("hydra heads read the model's input embeddings")
        self.heads = copy.deepcopy(heads).to(device=device, dtype=dtype).eval()  # (`to` moves a module in place)
        self.num_heads = heads.num_heads
        self.vocab = None if vocab is None else vocab.to(device)
        # [V', H]: the LM head's rows of the heads' vocabulary (a copy), or the whole LM head (a view)
        self.table = (lm_weight.detach() if vocab is None else lm_weight.detach().index_select(0, self.vocab)).to(dtype)
        self.embed = None if embed is None else embed.detach()  # [V, H] the model's input embeddings
        self.stop_ids = frozenset(stop_ids)
        self.min_confidence = MIN_CONFIDENCE
        self.proposals = {}

    @classmethod
    def load(cls, directory: Path, lm_weight: torch.Tensor, stop_ids: Sequence[int], k: int,
             embed: torch.Tensor | None = None, rows_kernel: bool = False) -> MedusaDrafter:
        heads, vocab, _ = load_heads(directory)
        if k > heads.num_heads:
            raise UserError(f"--num-speculative-tokens {k} asks for more tokens than the {heads.num_heads} "
                            f"medusa heads in {directory} guess")
        if heads.kind == "eagle":  # the layer that reads the thread's past (apar/engine/eagle.py)
            from apar.engine.eagle import EagleDrafter

            cls = EagleDrafter  # type: ignore[assignment]
        drafter = cls(heads, lm_weight, vocab, stop_ids, embed)
        if rows_kernel:  # the model's products run through apar/engine/rows_gemm.py: the drafter's too
            drafter.use_rows_kernel()
        if lm_weight.device.type == "cpu" and lm_weight.dtype == torch.float32:
            # the heads' guesses are only ever verified, so they may run in bfloat16 where that is faster:
            # on a CPU with bfloat16 instructions a few rows' products run about 3x faster (docs/benchmarks.md,
            # "Speculation that pays"); timed here, since a CPU without them runs bfloat16 slower
            half = cls(heads, lm_weight, vocab, stop_ids, embed, dtype=torch.bfloat16)
            if half.chain_seconds() < drafter.chain_seconds():
                drafter = half
        return drafter

    def chain_seconds(self, rows: int = 4, repeats: int = 3) -> float:
        """The best of `repeats` timings of the heads' chain on `rows` random rows (after one untimed)."""
        import time

        hidden = torch.randn(rows, self.heads.hidden, device=self.table.device)
        pending = torch.zeros(rows, dtype=torch.long, device=self.table.device)
        best = float("inf")
        for i in range(repeats + 1):
            start = time.perf_counter()
            self.chain(hidden, pending)
            if i:
                best = min(best, time.perf_counter() - start)
        return best

    @torch.inference_mode()
    def chain(self, hidden: torch.Tensor, pending: torch.Tensor, cut: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: [M, H] final hidden states, pending: [M] the token each row gave (the thread's pending
        token) -> (tokens [M, K], each head's probability of its token [M, K]). With `cut`, a hydra chain
        stops once every row has had a head below `min_confidence` (the later heads' tokens are then
        never drafted: their probabilities read 0)."""
        h = hidden.to(self.table.dtype)
        if self.heads.kind == "medusa":
            probs = self._logits(self.heads(h)).float().softmax(dim=-1)  # [M, K, V']
            conf, idx = probs.max(dim=-1)  # [M, K]
            return self._local(idx), conf
        z, tok, toks, confs = h, pending.to(self.table.device), [], []
        sure = torch.ones(len(h), dtype=torch.bool, device=h.device)  # rows whose heads so far were all sure
        for k in range(self.num_heads):
            z = self.heads.step(k, z, self.embed[tok].to(z.dtype))  # [M, H]
            conf, idx = self._logits(z).float().softmax(dim=-1).max(dim=-1)  # [M], [M]
            tok = self._local(idx)
            toks.append(tok)
            confs.append(conf)
            sure &= conf >= self.min_confidence
            if cut and k + 1 < self.num_heads and not bool(sure.any()):
                toks.extend([tok] * (self.num_heads - k - 1))
                confs.extend([torch.zeros_like(conf)] * (self.num_heads - k - 1))
                break
        return torch.stack(toks, dim=1), torch.stack(confs, dim=1)

    def guess(self, hidden: torch.Tensor, pending: Sequence[int] | torch.Tensor | None = None) -> list[list[int]]:
        """hidden: [M, H] final hidden states, pending: [M] the thread's pending token of each row -> per
        row the K heads' tokens, up to the first head whose own probability of its token is below
        `min_confidence` (a guess that would most likely be rejected costs its positions in the step and
        saves nothing) or before a control token."""
        pending = torch.zeros(len(hidden), dtype=torch.long) if pending is None else \
            torch.as_tensor(pending, dtype=torch.long)  # [M] (medusa heads do not read it)
        return [tokens for tokens, _ in self._cut(*self.chain(hidden, pending, cut=True))]

    def propose(self, keys: list[tuple[str, int]], lengths: list[int], hidden: torch.Tensor | None,
                tokens: list[int], counts: list[int]) -> None:
        """Replace the guesses by those of this step (`ByThread`): the heads read each run's last row and
        its pending token."""
        self.proposals = {}
        if not keys:
            return
        last = torch.tensor(counts).cumsum(0) - 1  # [M] each run's last row
        pending = torch.tensor(tokens)[last]
        self._keep(keys, lengths, *self.chain(hidden.index_select(0, last.to(hidden.device)), pending, cut=True))
