"""Fine-tune a Hugging Face causal LM on paragraph trees, one packed sequence per conversation.

Data flow: `TreeRecord`s -> `encode` (tokenize each tree, pack it; `flat=True` packs the restored linear
text instead: the auto-regressive twin) -> `Trainer.fit` (seeded batches, AdamW with warmup and cosine
decay, a progress bar, periodic loss, checkpoints in OUT/checkpoint, held-out evaluation) -> OUT holds
a model directory the engine loads (config, safetensors, tokenizer with the control tokens, summary).

The held-out loss is measured on the restored linear text of held-out responses with the control tokens
removed from the softmax (the engine's auto-regressive mode bans them), so an APAR model and its AR twin
are compared on the same tokens.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from apar.data.packing import ControlIds, PackedExample, collate, pack, token_loss_sum, tokenize_tree
from apar.data.pipeline import TreeRecord
from apar.data.tree import CHILD, FORK, linear, restore
from apar.engine.errors import UserError

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "train_summary.json"


@dataclass(slots=True)
class TrainConfig:
    """How long and how fast to train; checked on creation."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 512
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    save_every: int = 100
    flat: bool = False  # train on restored linear text (the AR twin)
    device: str = "auto"  # "auto": CUDA when present, else CPU
    fork_token: str = FORK
    child_token: str = CHILD
    lora_rank: int = 0  # > 0: LoRA adapters plus the control tokens' rows (apar/train/lora.py), else full
    lora_alpha: float = 16.0
    row_lr: float = 0.0  # learning rate of the control tokens' rows under LoRA (0: lr)
    fit_fork: int = 0  # LoRA: fit the [Fork] row to the base on this many training trees first (0: no)
    held_out_records: int = 0  # test-split records evaluated (0: all)

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.max_length, self.log_every, self.save_every) <= 0:
            raise UserError("steps, batch size, max length, log and save intervals must be positive")
        if self.lr <= 0 or self.warmup_steps < 0 or self.eval_every < 0:
            raise UserError("lr must be positive; warmup and eval interval must not be negative")
        if min(self.lora_rank, self.row_lr, self.fit_fork, self.held_out_records) < 0 or self.lora_alpha <= 0:
            raise UserError("LoRA rank, row lr, fit-fork and held-out records must not be negative")


def load_model(model_dir: Path):
    """Model (float32) and tokenizer from a local directory; a `UserError` for anything else."""
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model directory (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{model_dir}: cannot load the model: {exc}") from None
    return model, tokenizer


def add_control_tokens(model, tokenizer, fork: str = FORK, child: str = CHILD) -> list[str]:
    """Add the control tokens as special tokens when missing and resize the embeddings; returns added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (fork, child) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return missing


def encode(records: list[TreeRecord], tokenizer, control: ControlIds, max_length: int,
           flat: bool = False) -> list[PackedExample]:
    """Packed examples of records (trees, or restored linear text when `flat`)."""
    out = []
    for record in records:
        tree = linear(restore(record.tree)) if flat else record.tree
        out.append(pack(tokenize_tree(record.prompt, tree, tokenizer, control), control, max_length))
    return out


@dataclass(slots=True)
class TrainResult:
    steps: int
    train_loss: float  # mean over the last `log_every` steps
    held_out_loss: float | None  # linear text, control tokens banned
    held_out_tree_loss: float | None  # packed trees (APAR models only)
    tokens_per_second: float
    seconds: float


class Trainer:
    """One training run into `out`; resumable from `out/checkpoint`."""

    def __init__(self, model, tokenizer, config: TrainConfig, out: Path, groups: list[dict] | None = None):
        self.tokenizer, self.config, self.out = tokenizer, config, out
        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self.control = ControlIds.from_tokenizer(tokenizer, config.fork_token, config.child_token)
        if groups is None:  # full fine-tune
            decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
            rest = [p for n, p in model.named_parameters() if p.ndim < 2]
            groups = [{"params": decay, "weight_decay": config.weight_decay},
                      {"params": rest, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.losses: list[float] = []
        self._perms: dict[int, list[int]] = {}  # the current epoch's order of the training examples

    def _lr_factor(self, step: int) -> float:
        warm = self.config.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.config.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _batch(self, data: list[PackedExample], step: int) -> list[PackedExample]:
        """The examples of `step`: a seeded permutation per epoch, so a resumed run sees the same data."""
        size = self.config.batch_size
        picked = []
        for k in range(step * size, (step + 1) * size):
            epoch, offset = divmod(k, len(data))
            if epoch not in self._perms:
                seed = torch.Generator().manual_seed(self.config.seed + epoch)
                self._perms = {epoch: torch.randperm(len(data), generator=seed).tolist()}
            picked.append(data[self._perms[epoch][offset]])
        return picked

    def fit(self, train: list[PackedExample], held_out: list[PackedExample],
            held_out_trees: list[PackedExample] | None = None) -> TrainResult:
        if not train:
            raise UserError("no training examples")
        torch.manual_seed(self.config.seed)
        self.model.train()
        started, tokens = time.monotonic(), 0
        bar = tqdm(total=self.config.steps, initial=self.step, desc="train", unit="step",
                   file=sys.stderr, disable=None, dynamic_ncols=True)
        while self.step < self.config.steps:
            batch = self._collate(self._batch(train, self.step))
            loss = self._train_step(batch)
            tokens += int((batch["labels"] != -100).sum())
            self.losses.append(loss)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.step % self.config.log_every == 0:
                rate = tokens / max(1e-9, time.monotonic() - started)
                recent = self.losses[-self.config.log_every:]
                bar.write(f"step {self.step}/{self.config.steps}  loss {sum(recent) / len(recent):.4f}  "
                          f"lr {self.scheduler.get_last_lr()[0]:.2e}  {rate:.0f} tok/s")
            if self.config.eval_every and self.step % self.config.eval_every == 0 and held_out:
                bar.write(f"step {self.step}  held-out loss {self.evaluate(held_out, ban_control=True):.4f}")
            due = self.step % self.config.save_every == 0 and self.step < self.config.steps
            if due and not self.config.lora_rank:  # a LoRA run keeps no checkpoint (it is short)
                self.save_checkpoint()
        bar.close()
        seconds = time.monotonic() - started
        recent = self.losses[-self.config.log_every:]
        return TrainResult(
            steps=self.step,
            train_loss=sum(recent) / max(1, len(recent)),
            held_out_loss=self.evaluate(held_out, ban_control=True) if held_out else None,
            held_out_tree_loss=self.evaluate(held_out_trees) if held_out_trees else None,
            tokens_per_second=tokens / max(1e-9, seconds),
            seconds=seconds,
        )

    def _collate(self, examples: list[PackedExample]) -> dict:
        batch = collate(examples, self.tokenizer.pad_token_id)
        return {key: value.to(self.device) for key, value in batch.items()}

    def _train_step(self, batch: dict) -> float:
        self.model.train()
        logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            attention_mask=batch["attention_mask"]).logits  # [B, L, V]
        loss_sum, count = token_loss_sum(logits, batch["labels"])
        loss = loss_sum / max(1, count)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, examples: list[PackedExample], ban_control: bool = False) -> float:
        """Token-weighted mean loss; `ban_control` removes [Fork]/[Child] from the softmax first."""
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), self.config.batch_size):
            batch = self._collate(examples[i:i + self.config.batch_size])
            logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                attention_mask=batch["attention_mask"]).logits  # [B, L, V]
            if ban_control:
                logits[..., [self.control.fork, self.control.child]] = float("-inf")
            loss_sum, n = token_loss_sum(logits, batch["labels"])
            total += float(loss_sum)
            count += n
        self.model.train()
        return total / max(1, count)

    def save_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        tmp = self.out / (CHECKPOINT + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        torch.save({"step": self.step, "losses": self.losses, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "config": asdict(self.config)}, tmp / STATE_FILE)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    def load_state(self, checkpoint: Path) -> None:
        """Resume optimizer, schedule and step from a checkpoint (the model is loaded from it already)."""
        state = torch.load(checkpoint / STATE_FILE, weights_only=False, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.losses = int(state["step"]), list(state["losses"])

    def save_final(self, result: TrainResult, extra: dict | None = None) -> None:
        """Write the model directory and a summary, then drop the checkpoint."""
        self.model.save_pretrained(str(self.out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(self.out))
        summary = {"result": asdict(result), "config": asdict(self.config), **(extra or {})}
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(self.out / CHECKPOINT, ignore_errors=True)


def train_records(model, tokenizer, records: list[TreeRecord], config: TrainConfig, out: Path,
                  resume_from: Path | None = None, extra: dict | None = None) -> TrainResult:
    """Train on the records of the train split, evaluate on the test split, write the model to `out`.

    `model`/`tokenizer` already carry the control tokens (`add_control_tokens`); `resume_from` is a
    checkpoint directory the model was loaded from, whose optimizer state and step are restored.
    With `config.lora_rank` the run trains LoRA adapters and the control tokens' rows (apar/train/lora.py),
    writes the merged model to `out` and the delta to `out/delta`.
    """
    train = [r for r in records if r.split == "train"]
    held = [r for r in records if r.split == "test"]
    if config.held_out_records:
        held = held[: config.held_out_records]
    out.mkdir(parents=True, exist_ok=True)
    control = ControlIds.from_tokenizer(tokenizer, config.fork_token, config.child_token)
    examples = encode(train, tokenizer, control, config.max_length, config.flat)
    info: dict = {"train_records": len(train), "held_out_records": len(held), **(extra or {})}
    groups = None
    if config.lora_rank:
        if resume_from is not None:
            raise UserError("a LoRA run cannot be resumed (it keeps no checkpoint)")
        groups, info["lora"] = _prepare_lora(model, tokenizer, control, config, examples)
    trainer = Trainer(model, tokenizer, config, out, groups)
    if resume_from is not None:
        trainer.load_state(resume_from)
    held_linear = encode(held, tokenizer, control, config.max_length, flat=True)
    held_trees = None if config.flat else encode(held, tokenizer, control, config.max_length)
    result = trainer.fit(examples, held_linear, held_trees)
    if config.lora_rank:
        from apar.train.lora import merge_lora, write_delta

        meta = {"rank": config.lora_rank, "alpha": config.lora_alpha, **info["lora"]}
        write_delta(model, out / "delta", [control.fork, control.child], meta)
        merge_lora(model)
    trainer.save_final(result, info)
    return result


def _prepare_lora(model, tokenizer, control: ControlIds, config: TrainConfig,
                  examples: list[PackedExample]) -> tuple[list[dict], dict]:
    """Attach adapters, fit the [Fork] row (when asked), free the new rows: the optimizer's groups."""
    from apar.train.lora import attach_lora, fit_fork_row, lora_parameters, train_new_rows

    first = min(control.fork, control.child)
    adapter_params = attach_lora(model, config.lora_rank, config.lora_alpha, config.seed)
    info: dict = {"adapter_parameters": adapter_params, "first_new_row": first}
    if config.fit_fork and not config.flat:
        picked = examples[: config.fit_fork]
        batches = [collate(picked[i:i + 4], tokenizer.pad_token_id) for i in range(0, len(picked), 4)]
        started = time.monotonic()
        info["fork_fit"] = fit_fork_row(model, batches, control.fork, [control.child])
        info["fork_fit"]["seconds"] = round(time.monotonic() - started, 1)
        print(f"fitted the [Fork] row to the base: {info['fork_fit']}", file=sys.stderr)
    rows = train_new_rows(model, first)
    groups = [{"params": lora_parameters(model), "weight_decay": config.weight_decay},
              {"params": rows, "weight_decay": 0.0, "lr": config.row_lr or config.lr}]
    return groups, info
