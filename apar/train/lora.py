"""Low-rank fine-tuning of a pretrained model into APAR form, and the small delta it leaves behind.

Why not a full fine-tune: on a short CPU budget a full fine-tune of a pretrained model learns that a
thread ends after its item but never where to fork (it never emits [Fork]). What is trained instead:
- LoRA adapters (`LoraLinear`) on the attention and MLP projections of every layer; the base stays frozen;
- the control tokens' embedding rows only (`train_new_rows`): with tied embeddings (SmolLM2) a row is
  both the token's input vector and its output row, so it sets where the model wants to fork; the rows
  get their own, higher learning rate;
- before training, the [Fork] row is fitted to the frozen base (`fit_fork_row`): on some training
  trees it is the vector that minimises the base's own next-token loss at every labelled position, fork
  points included, so the logit of [Fork] starts competitive where the data forks and low elsewhere.

The delta (`write_delta`/`read_delta`/`apply_delta`): the LoRA matrices (float16) and the new rows
(float32) in one safetensors file, with a JSON beside it (rank, alpha, targets, row ids, base file
SHA-256). Applying it to the imported base (W += alpha/rank * B @ A; rows set) needs only torch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from apar.engine.errors import UserError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DELTA_TENSORS = "delta.safetensors"
DELTA_META = "delta.json"


class LoraLinear(nn.Module):
    """`base(x) + scale * x A^T B^T`; A: [r, in] (small random), B: [out, r] (zeros, so it starts as base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale  # [out, in]
        return self.base


def _targets(model) -> list[tuple[nn.Module, str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in TARGETS and isinstance(child, (nn.Linear, LoraLinear)):
                found.append((module, child_name, child))
    return found


def attach_lora(model, rank: int, alpha: float, seed: int = 0) -> int:
    """Freeze every weight and wrap each target projection in a `LoraLinear`; returns adapter parameters."""
    if rank <= 0:
        raise UserError("the LoRA rank must be positive")
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    count = 0
    for parent, name, child in _targets(model):
        if isinstance(child, LoraLinear):
            raise UserError("the model already has LoRA adapters")
        wrapped = LoraLinear(child, rank, alpha)
        setattr(parent, name, wrapped)
        count += wrapped.lora_a.numel() + wrapped.lora_b.numel()
    if not count:
        raise UserError(f"no LoRA target projections ({', '.join(TARGETS)}) in the model")
    return count


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoraLinear) for p in (m.lora_a, m.lora_b)]


def merge_lora(model) -> None:
    """Fold every adapter into its base weight and unwrap it: a plain model again."""
    for parent, name, child in _targets(model):
        if isinstance(child, LoraLinear):
            setattr(parent, name, child.merged())


def train_new_rows(model, first: int) -> list[nn.Parameter]:
    """Let the embedding rows from `first` on learn (the rest stay fixed: their gradient is zeroed).

    With tied embeddings the input table is also the output table; an untied output table's new rows
    are trained the same way. Returns the tables (for the optimizer: no weight decay, or the fixed rows
    would move)."""
    tables = new_row_tables(model)
    for table in tables:
        table.requires_grad_(True)

        def keep_new(grad: torch.Tensor) -> torch.Tensor:  # grad: [V, H]
            grad = grad.clone()
            grad[:first] = 0
            return grad

        table.register_hook(keep_new)
    return tables


def new_row_tables(model) -> list[nn.Parameter]:
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not tables[0]:
        tables.append(out.weight)
    return tables


@torch.no_grad()
def _hidden(model, batch: dict) -> torch.Tensor:
    """Last hidden state (after the final norm) of a collated batch. # [B, L, H]"""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return body(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"]).last_hidden_state


def fit_fork_row(model, batches: list[dict], fork: int, exclude: list[int], steps: int = 300,
                 lr: float = 0.02) -> dict:
    """Set the [Fork] output row to minimise the frozen model's loss at every labelled position.

    `batches` are collated packed trees; `exclude` are other new token ids left out of the softmax.
    Only the row changes; the rest of the vocabulary's logits are computed once. Returns fit figures."""
    out_table = new_row_tables(model)[-1]  # the output rows (the input table too when tied)
    keep = torch.ones(out_table.shape[0], dtype=torch.bool)
    keep[[fork, *exclude]] = False
    hs, lse, target_logit, is_fork = [], [], [], []
    model.eval()
    for batch in batches:
        h = _hidden(model, batch)  # [B, L, H]
        labels = batch["labels"]  # [B, L]
        picked = labels != -100
        h = h[picked]  # [N, H]
        lab = labels[picked]  # [N]
        logits = h @ out_table.t()  # [N, V]
        hs.append(h)
        lse.append(torch.logsumexp(logits[:, keep], dim=-1))
        target_logit.append(logits.gather(1, lab[:, None])[:, 0])
        is_fork.append(lab == fork)
    h, lse, target_logit, is_fork = (torch.cat(x) for x in (hs, lse, target_logit, is_fork))
    if not bool(is_fork.any()):
        return {"fork_positions": 0}
    row = out_table[fork].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([row], lr=lr)

    def loss_of(r: torch.Tensor) -> torch.Tensor:
        f = h @ r  # [N]
        total = torch.logaddexp(lse, f)
        return (total - torch.where(is_fork, f, target_logit)).mean()

    with torch.no_grad():
        before = float(loss_of(row))
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_of(row)
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = float(loss_of(row))
        f = h @ row
        recall = float(((f > lse - math.log(2.0)) & is_fork).sum() / is_fork.sum())
        false_rate = float(((f > lse) & ~is_fork).sum() / (~is_fork).sum())
        out_table[fork] = row.detach()
    model.train()
    return {"fork_positions": int(is_fork.sum()), "positions": int(is_fork.numel()), "loss_before": before,
            "loss_after": after, "fork_top_recall": recall, "fork_top_false_rate": false_rate}


def delta_state(model, row_ids: list[int]) -> dict[str, torch.Tensor]:
    """The trained tensors: each adapter's A and B (float16) and the new rows (float32)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            state[f"{name}.lora_a"] = module.lora_a.detach().to(torch.float16).contiguous()
            state[f"{name}.lora_b"] = module.lora_b.detach().to(torch.float16).contiguous()
    tables = new_row_tables(model)
    state["rows.input"] = tables[0][row_ids].detach().float().contiguous()  # [R, H]
    if len(tables) > 1:
        state["rows.output"] = tables[1][row_ids].detach().float().contiguous()
    return state


def write_delta(model, out: Path, row_ids: list[int], meta: dict) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(delta_state(model, row_ids), str(out / DELTA_TENSORS))
    (out / DELTA_META).write_text(json.dumps({**meta, "row_ids": row_ids}, indent=2) + "\n")
    return out / DELTA_TENSORS


def apply_delta(model, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Merge a delta into a plain model (base rows already grown to the tokenizer's size)."""
    scale = float(meta["alpha"]) / int(meta["rank"])
    modules = dict(model.named_modules())
    adapters = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".lora_a", ".lora_b"))})
    with torch.no_grad():
        for name in adapters:
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                raise UserError(f"the delta adapts {name}, which the base model has no linear layer for")
            a = tensors[f"{name}.lora_a"].float()  # [r, in]
            b = tensors[f"{name}.lora_b"].float()  # [out, r]
            if b.shape[0] != layer.out_features or a.shape[1] != layer.in_features:
                raise UserError(f"the delta's {name} is {tuple(b.shape[:1]) + tuple(a.shape[1:])}, the base's "
                                f"{(layer.out_features, layer.in_features)}: another base model?")
            layer.weight += (b @ a * scale).to(layer.weight.dtype)
        row_ids = [int(i) for i in meta["row_ids"]]
        tables = new_row_tables(model)
        if max(row_ids) >= tables[0].shape[0]:
            raise UserError("the delta's rows lie beyond the base model's vocabulary")
        tables[0][row_ids] = tensors["rows.input"].to(tables[0].dtype)
        if len(tables) > 1:
            tables[1][row_ids] = tensors.get("rows.output", tensors["rows.input"]).to(tables[1].dtype)
