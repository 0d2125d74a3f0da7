"""The numeric precision a run trains and evaluates in, chosen from the hardware: its autocast context, its
loss scaler, the dtype the frozen base weights are stored in, and the one line that tells the user.

    CUDA, compute capability >= 8.0 (A100, RTX 30xx/40xx, H100)  bf16 mixed precision (native bf16 tensor cores)
    CUDA, compute capability <  8.0 (T4, V100, RTX 20xx)         fp16 mixed precision with dynamic loss scaling
    CPU                                                          fp32
    MPS (Apple silicon)                                          fp32 (see choose_precision)

"Mixed" means torch.autocast: matmuls run in the low dtype; LayerNorms, softmax, the residual stream, the LoRA
matrices, the head, the logits, the loss and the optimizer state stay fp32. The card's capability is read
through torch.cuda.get_device_capability, never torch.cuda.is_bf16_supported(), which answers True on a T4
because bf16 can be emulated there (slowly).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from errors import UserError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: no autocast
NATIVE_BF16 = (8, 0)  # Ampere: the first compute capability with bf16 tensor cores
# Frozen weights that stay fp32 when the rest are stored in the compute dtype: wpe keeps the residual stream
# (wte + wpe) fp32, and the classification head is trained (and tiny).
KEEP_FP32 = ("wpe", "score")


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16" | "fp16"
    device_type: str  # "cuda" | "cpu" | "mps"

    def __post_init__(self):
        if self.name not in DTYPES:
            raise UserError(f"--precision {self.name!r} is not one of auto, {', '.join(DTYPES)}")

    @property
    def dtype(self) -> torch.dtype | None:
        """The compute dtype of matmuls under autocast; None for fp32 (autocast off)."""
        return DTYPES[self.name]

    @property
    def loss_scaling(self) -> bool:
        """fp16's 5-bit exponent flushes small gradients to zero unless the loss is scaled up first."""
        return self.name == "fp16"

    def autocast(self, cache: bool = True) -> torch.autocast:
        """The forward pass's context. Under CUDA-graph capture the cache of cast weights must be off (cache=False)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None, cache_enabled=cache)

    def make_scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaling for fp16; a disabled scaler (its calls pass through) otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.loss_scaling)

    def describe(self) -> str:
        return {"fp32": "fp32", "bf16": "bf16 mixed", "fp16": "fp16 mixed, loss scaling"}[self.name]


def autocast_off(device_type: str) -> torch.autocast | nullcontext:
    """A context with autocast off on `device_type` (what must run in fp32 whatever the precision: the student, the
    classification head). torch before 2.5 has no MPS autocast and refuses torch.autocast("mps"), even disabled:
    where autocast does not exist, there is nothing to turn off."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))  # public from torch 2.4
    if available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def cuda_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def choose_precision(device: torch.device, requested: str = "auto") -> Precision:
    """--precision for `device`. auto: bf16 on CUDA >= 8.0, fp16 (loss-scaled) below, fp32 on CPU and MPS.

    Any precision may be asked for. bf16 on a card below 8.0 runs, emulated and slow, with a one-line warning.

    MPS gets fp32 under auto: torch's AMP documentation lists the ops autocast converts on CUDA, XPU and CPU
    but gives no list for MPS, and documents GradScaler for CUDA and CPU only, so neither fp16 nor bf16 autocast
    on MPS has a documented behaviour to rely on; bf16 also needs macOS 14. fp32 is correct on every Mac, and
    --precision fp16 or bf16 remain there to try (unmeasured in this project).
    """
    if requested != "auto" and requested not in DTYPES:
        raise UserError(f"--precision {requested!r} is not one of auto, {', '.join(DTYPES)}")
    if device.type == "cuda":
        native_bf16 = cuda_capability(device) >= NATIVE_BF16
        name = ("bf16" if native_bf16 else "fp16") if requested == "auto" else requested
        if name == "bf16" and not native_bf16:
            major, minor = cuda_capability(device)
            print(f"warning: --precision bf16 on {cuda_name(device)} (compute capability {major}.{minor} < 8.0): "
                  "bf16 is emulated there and slow; fp16 (--precision auto) runs on its tensor cores",
                  file=sys.stderr)
    else:
        name = "fp32" if requested == "auto" else requested
    return Precision(name, device.type)


def device_line(device: torch.device, precision: Precision) -> str:
    """e.g. `device: cuda (Tesla T4, compute capability 7.5), precision: fp16 mixed, loss scaling`."""
    where = str(device)
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        where += f" ({cuda_name(device)}, compute capability {major}.{minor})"
    return f"device: {where}, precision: {precision.describe()}"


def store_frozen_weights(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Store the frozen weights and biases of every linear layer and embedding in the compute dtype, so autocast
    stops re-casting them every step (most of the 821 copy kernels of a gpt2-medium step) and they take 2
    bytes a parameter. Trainable tensors (LoRA's A and B, the head) stay fp32, as do the LayerNorms (not
    Linear), wpe and the head (KEEP_FP32). dtype None (fp32) changes nothing.

    Under autocast a matmul casts its fp32 weight to the compute dtype anyway, so it sees the same values. The
    one difference is the token embedding: a lookup is not an autocast op, so wte's values reach the fp32
    residual stream (wte + wpe) rounded to the compute dtype instead of exact. A model stored this way must
    run under its precision's autocast: outside it, fp32 activations meet low-precision weights."""
    if dtype is None:
        return
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and name.rsplit(".", 1)[-1] not in KEEP_FP32:
            for p in (m.weight, getattr(m, "bias", None)):
                if p is not None and not p.requires_grad:
                    p.data = p.data.to(dtype)
