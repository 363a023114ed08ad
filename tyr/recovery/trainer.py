"""The recovery loop: distil the dense teacher into the pruned student, resumable step by step.

One optimiser step reads ``batch_size`` windows (split over the ranks under torchrun, then into
micro-batches of ``micro_batch_size``), runs the teacher on them (no gradients), and back-propagates
the mean per-position distillation loss (:mod:`tyr.recovery.loss`). AdamW, linear warm-up then
cosine decay to ``min_lr_ratio`` × ``lr``, gradient clipping, optional bf16 autocast. Every
``checkpoint_every`` steps a checkpoint (:mod:`tyr.recovery.checkpoint`) is written; a rerun
continues from the newest valid one and, on one thread, ends with the same weights bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tyr import dist
from tyr.recovery import checkpoint
from tyr.recovery.data import RecoveryError
from tyr.recovery.lora import LoraSettings, add_lora, keep_padding_zero, merge_lora, set_full_training, trainable
from tyr.recovery.loss import distill_loss, teacher_targets
from tyr.utils import JsonlWriter

log = logging.getLogger(__name__)

MODES = ("lora", "full")
# Settings that change how fast or how often, not what is trained: left out of the artifact key.
RUNTIME_FIELDS = ("checkpoint_every", "log_every", "keep_checkpoints", "device")


@dataclass(frozen=True)
class RecoverySettings:
    mode: str  # lora | full
    tokens: int  # the token budget: steps = tokens // (batch_size * seq_len)
    sources: tuple[tuple[str, float], ...]  # (text source, weight)
    seq_len: int
    batch_size: int  # windows per optimiser step, over all ranks
    micro_batch_size: int  # windows per forward/backward
    lr: float
    min_lr_ratio: float
    warmup: float  # fraction of the steps
    weight_decay: float
    max_grad_norm: float  # 0 = no clipping
    topk: int
    ce_weight: float
    bf16: bool
    lora: LoraSettings
    train_embeddings: bool  # full mode: also the token embedding / output head
    seed: int
    checkpoint_every: int
    log_every: int
    keep_checkpoints: int
    device: str

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.seq_len)

    @property
    def windows(self) -> int:
        return self.steps * self.batch_size

    def validate(self) -> None:
        """Raise :class:`RecoveryError` naming the first bad setting."""
        checks = [
            (self.mode in MODES, f"recover.mode must be one of {MODES}, got {self.mode!r}"),
            (self.seq_len >= 2, f"recover.seq_len must be at least 2, got {self.seq_len}"),
            (self.batch_size >= 1 and 1 <= self.micro_batch_size, "recover.batch_size and micro_batch_size must be >= 1"),
            (
                self.tokens >= self.batch_size * self.seq_len,
                f"recover.tokens={self.tokens} is less than one step (batch_size x seq_len = {self.batch_size * self.seq_len})",
            ),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "recover.lr must be > 0 and min_lr_ratio in [0, 1]"),
            (0 <= self.warmup < 1, f"recover.warmup is a fraction of the steps in [0, 1), got {self.warmup}"),
            (self.weight_decay >= 0 and self.max_grad_norm >= 0, "recover.weight_decay and max_grad_norm must be >= 0"),
            (self.topk >= 1 and self.ce_weight >= 0, "recover.topk must be >= 1 and ce_weight >= 0"),
            (len(self.sources) > 0 and all(w > 0 for _, w in self.sources), "recover.data needs sources with weights > 0"),
            (
                self.checkpoint_every >= 1 and self.log_every >= 1 and self.keep_checkpoints >= 1,
                "recover.checkpoint_every, log_every and keep_checkpoints must be >= 1",
            ),
        ]
        if self.mode == "lora":
            checks += [
                (
                    self.lora.rank >= 1 and self.lora.alpha > 0 and 0 <= self.lora.dropout < 1,
                    "recover.lora: rank >= 1, alpha > 0, dropout in [0, 1)",
                ),
                (len(self.lora.target_modules) > 0, "recover.lora.target_modules is empty"),
            ]
        for ok, msg in checks:
            if not ok:
                raise RecoveryError(msg)

    def key(self, student_fingerprint: str, teacher_id: str) -> str:
        """A hash of what the run trains: the settings (but the runtime ones) and both models."""
        d = {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}
        blob = json.dumps({"settings": d, "student": student_fingerprint, "teacher": teacher_id}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's tensors (names, shapes, dtypes, bytes): the identity of a pruned student."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def learning_rate(s: RecoverySettings, step: int) -> float:
    """Linear warm-up over the first ``warmup`` of the steps, then cosine decay to ``min_lr_ratio``."""
    warm = round(s.warmup * s.steps)
    if step < warm:
        return s.lr * (step + 1) / warm
    t = (step - warm) / max(1, s.steps - warm)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _autocast(s: RecoverySettings, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if s.bf16 else nullcontext()


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    if dist.world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce_(p.grad)


def train(
    teacher,
    student,
    windows: torch.Tensor,
    s: RecoverySettings,
    out_dir: Path,
    stop_after: int | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Distil ``teacher`` into ``student`` on ``windows`` [s.windows, seq_len]; resumes from the newest
    checkpoint in ``out_dir/checkpoints``. Returns the trained student (LoRA merged: a plain model of
    the same structure) and a summary. ``stop_after``: return after that many steps of this call,
    with a checkpoint (for tests and time-sliced runs); the summary then says ``finished: False``."""
    s.validate()
    if windows.shape[0] < s.windows or windows.shape[1] != s.seq_len:
        raise RecoveryError(f"need {s.windows} windows of {s.seq_len} tokens, got {tuple(windows.shape)}")
    device = torch.device(s.device)
    teacher.eval().to(device)
    student.to(device)
    torch.manual_seed(s.seed)  # LoRA's initialisation, dropout
    peft_model = None
    if s.mode == "lora":
        peft_model = add_lora(student, s.lora)
    else:
        set_full_training(student, s.train_embeddings)
    student.train()
    params = trainable(student)
    n_train = sum(p.numel() for p in params.values())
    opt = torch.optim.AdamW(list(params.values()), lr=s.lr, weight_decay=s.weight_decay)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir / "checkpoints"
    metrics = out_dir / "metrics.jsonl"
    start, seconds = 0, 0.0
    ckpt = checkpoint.latest(root)
    if ckpt is not None:
        st = checkpoint.load(ckpt, params, opt)
        start, seconds = int(st["step"]), float(st.get("seconds", 0.0))
        log.info("resuming recovery from %s (step %d of %d)", ckpt, start, s.steps)
    if dist.is_main():  # drop metrics of steps after the checkpoint (a killed run's tail)
        keep = [l for l in metrics.read_text().splitlines() if json.loads(l).get("step", 0) <= start] if metrics.exists() else []
        metrics.write_text("".join(l + "\n" for l in keep))
    writer = JsonlWriter(metrics)
    T, B = s.seq_len, s.batch_size
    positions = B * (T - 1)
    mine = dist.shard(B)
    log.info(
        "recovery (%s): %d steps x %d windows x %d tokens = %s tokens; %s trainable parameters",
        s.mode,
        s.steps,
        B,
        T,
        f"{s.steps * B * T:,}",
        f"{n_train:,}",
    )
    end = s.steps if stop_after is None else min(s.steps, start + stop_after)
    bar = tqdm(total=s.steps, initial=start, desc=f"recover {s.mode}", disable=None if progress and dist.is_main() else True)
    step = start
    with keep_padding_zero(student):
        for step in range(start, end):
            t0 = time.time()
            lr = learning_rate(s, step)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = windows[step * B : (step + 1) * B][mine.start : mine.stop]
            sums = torch.zeros(3, dtype=torch.float64)
            for i in range(0, batch.shape[0], s.micro_batch_size):
                x = batch[i : i + s.micro_batch_size].to(device)
                with _autocast(s, device):
                    target = teacher_targets(teacher, x, s.topk)
                    out = distill_loss(student, x, target, s.ce_weight)
                (out["loss"] / positions).backward()
                sums += torch.stack([out[k].detach().double().cpu() for k in ("loss", "kl", "ce")])
            plist = list(params.values())
            _all_reduce_grads(plist)
            dist.all_reduce_(sums)
            norm = (
                torch.nn.utils.clip_grad_norm_(plist, s.max_grad_norm)
                if s.max_grad_norm > 0
                else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plist if p.grad is not None]))
            )
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.time() - t0
            seconds += dt
            loss, kl, ce = (float(v) / positions for v in sums)
            rec = {
                "step": step + 1,
                "tokens": (step + 1) * B * T,
                "loss": loss,
                "kl": kl,
                "ce": ce,
                "lr": lr,
                "grad_norm": float(norm),
                "tokens_per_s": B * T / dt,
                "seconds": seconds,
            }
            if dist.is_main():
                writer.write(**rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{B * T / dt:.0f}")
            if bar.disable and ((step + 1) % s.log_every == 0 or step + 1 == s.steps):
                log.info(
                    "recover step %d/%d: loss %.4f (KL %.4f) lr %.2e, %.0f tokens/s", step + 1, s.steps, loss, kl, lr, B * T / dt
                )
            done = step + 1
            if done % s.checkpoint_every == 0 or done == end:
                if dist.is_main():
                    checkpoint.save(
                        root,
                        done,
                        params,
                        opt,
                        {"tokens": done * B * T, "window": done * B, "seconds": seconds},
                        s.keep_checkpoints,
                    )
                dist.barrier()
    bar.close()
    finished = end == s.steps
    summary = {
        "steps": s.steps,
        "steps_done": end,
        "finished": finished,
        "tokens": end * B * T,
        "seconds": seconds,
        "trainable_params": n_train,
        "mode": s.mode,
        "world": dist.world(),
    }
    student.eval()
    if peft_model is not None:
        student = merge_lora(peft_model)
    for p in student.parameters():
        p.requires_grad_(False)
    return student, summary
