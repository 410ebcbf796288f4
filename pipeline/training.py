"""What pre-training and fine-tuning share: the optimizer, the learning-rate schedule, mixed precision, and
the random states a checkpoint must restore."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float, exempt_biases_and_norms: bool,
          fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay; with `exempt_biases_and_norms`, biases and norm weights (the
    1-D parameters) are not decayed, as BERT's pre-training does."""
    if not exempt_biases_and_norms:
        return torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay, fused=fused)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, fused=fused)


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor of update `step`: linear warm-up over `warmup` updates (the first update at
    1/warmup of the peak), then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def hf_linear_schedule(step: int, total: int, warmup: int) -> float:
    """transformers' get_scheduler("linear"), which the reference uses: the warm-up starts at 0 (the first
    update has learning rate 0), then linear decay to 0 at `total`; no warm-up when `warmup` is 0."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def constant_schedule(step: int, total: int, warmup: int) -> float:
    """linear's warm-up, then the peak learning rate: the factor of an update does not depend on `total`."""
    return (step + 1) / warmup if step < warmup else 1.0


SCHEDULES = {"linear": linear_schedule, "hf_linear": hf_linear_schedule, "constant": constant_schedule}


def warmup_then_decay(optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float, schedule: str = "linear",
                      warmup_steps: int | None = None):
    """Warm-up over warmup_steps, or int(warmup_fraction * total) updates (the reference's `updates // 100` for
    0.01), then decay (none for constant); `linear` warms up for at least one update, `hf_linear` as
    transformers does."""
    warmup = int(warmup_fraction * total) if warmup_steps is None else warmup_steps
    factor = SCHEDULES[schedule]
    if schedule == "linear":
        warmup = max(1, warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step, total, warmup))


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_DEVICES = ("cuda",)  # where autocast and the gradient scaler apply: the CPU trains in full precision


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 or fp16 autocast on a GPU; full precision on the CPU, or with precision fp32."""
    if device.type not in AMP_DEVICES or precision not in AUTOCAST_DTYPES:
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The loss scaler fp16 needs (its gradients underflow unscaled), as the reference trains; inactive (a
    pass-through) otherwise. It skips an update whose gradients overflowed and lowers its scale."""
    return torch.amp.GradScaler(device.type, enabled=device.type in AMP_DEVICES and precision == "fp16")


def rng_states() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def training_precision(device) -> None:
    """On a GPU, the float32 matrix products left outside autocast (the heads' float() logits, the losses) use
    TensorFloat-32, as BERT pre-training recipes do: off by default in torch, they ran at a fraction of the
    tensor cores' speed. The solvers (lasso, dictionary) keep their own precision setting and never train
    under this."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
