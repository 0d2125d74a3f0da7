"""LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update.

    h = W0 x + (alpha / r) * B A dropout(x),   A: (r, in) random,  B: (out, r) zero

B starts at zero, so the wrapped model computes exactly what the pretrained one did at step 0.
LoRALinear subclasses nn.Linear and keeps W0 as `weight`, so state-dict names stay those of GPT-2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from errors import UserError
from model import GPT, base_fingerprint

# Selectable targets: the attention and MLP projections of every GPT-2 block.
TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """What dropout(p) keeps, on CPU: a bool tensor, each element True with probability 1 - p, independently.

    F.dropout on CPU draws each element with bernoulli_ (about 7 ns apiece, as much as a third of the matmul
    that follows on mlp.c_proj's 3072-wide input), then rescales the mask. Here each 64-bit draw of the same
    generator gives two 32-bit integers, each compared with a threshold: the same distribution (to within
    2^-32), at about a third of the cost.
    """
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-2**63, None).view(torch.int32)[:n]
    threshold = min(round(p * 2**32), 2**32 - 1) - 2**31  # P(bits < threshold) = p
    return (bits >= threshold).view(shape)


class MaskedInput(torch.autograd.Function):
    """x * keep, for a bool mask `keep`, keeping only `keep` for backward: 1 byte an element where autograd's
    multiply by a float mask (or F.dropout on CPU) keeps 4. On the 3072-wide input of mlp.c_proj, that float
    mask is the largest thing LoRA keeps beyond what full fine-tuning does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(keep)
        return x * keep.to(x.dtype)  # converting, then a float multiply, is faster than a multiply by a bool

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep, None


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, bias: bool = True):
        if not 1 <= r <= min(in_features, out_features):
            raise UserError(f"--lora_rank {r} must be between 1 and {min(in_features, out_features)} "
                            f"for a {in_features}x{out_features} layer")
        super().__init__(in_features, out_features, bias=bias)
        self.r, self.alpha = r, alpha
        # rsLoRA (Kalajdzievska, 2023) keeps the update's scale stable as r grows.
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.reset_lora_parameters()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.merged = False

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, loralib and PEFT
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                    rslora: bool = False) -> LoRALinear:
        """Wrap an existing layer, sharing (not copying) its frozen weight and bias.

        The layer is built on the meta device, so no full-size weight is allocated or randomly drawn only to
        be replaced; A and B are then made where the weight lives, A drawn from the global RNG."""
        with torch.device("meta"):
            lora = cls(linear.in_features, linear.out_features, r, alpha, dropout, rslora, bias=linear.bias is not None)
        lora.weight, lora.bias = linear.weight, linear.bias
        lora.weight.requires_grad_(False)
        if lora.bias is not None:
            lora.bias.requires_grad_(False)
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        lora.lora_A = nn.Parameter(torch.empty(r, linear.in_features, **like))  # (r, in)
        lora.lora_B = nn.Parameter(torch.empty(linear.out_features, r, **like))  # (out, r)
        lora.reset_lora_parameters()
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + b + scaling * B A dropout(x), as three matmuls and no full-size elementwise pass but the
        dropout's: the scaling (and dropout's 1 / (1 - p)) multiplies the (N, r) product A x, and B's product
        accumulates in place into W0 x + b (its matmul's backward does not need its output)."""
        if self.merged:
            if self.training and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
                # W0 + B A is one frozen tensor now: a training step would silently leave A and B untouched.
                raise RuntimeError("a merged LoRALinear cannot be trained (A and B get no gradient): call "
                                   "unmerge() (lora.unmerge_lora(model)) first; for inference use model.eval() or "
                                   "torch.no_grad()")
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        p, scale = self.lora_dropout.p, self.scaling
        if self.training and p > 0 and x.device.type == "cpu":
            x2_drop = MaskedInput.apply(x2, keep_mask(x2.shape, p))  # the kept inputs, unscaled
            scale = scale / (1 - p)
        else:
            x2_drop = self.lora_dropout(x2)  # elsewhere (CUDA) dropout is one fused kernel already
        y = F.linear(x2, self.weight, self.bias)  # (N, out)
        u = F.linear(x2_drop, self.lora_A) * scale  # (N, r)
        y.addmm_(u, self.lora_B.t().to(u.dtype))  # under autocast y and u are bf16, and in-place ops are not cast
        return y.view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B A into W0 so inference costs one matmul. Merging a merged layer does nothing.

        In floating point (W0 + dW) - dW is not always W0: where W0 + dW lands in a higher binade than W0, it
        is rounded to a coarser grid and W0's low bits are lost (in float32, 1-2% of the elements when dW is
        about 1% of W0, more as dW grows; about 6e-8 each). merge keeps those elements' original values (flat
        index and value, 12 bytes each) and unmerge puts them back: exact, for about 6% of W0's memory while
        merged when 2% are kept, where keeping a copy of W0 would double it.
        """
        if not self.merged:
            delta = self.delta_weight().to(self.weight.dtype)  # (out, in)
            merged = self.weight + delta
            lost = ((merged - delta) != self.weight).flatten().nonzero().squeeze(1)  # (n_lost,) flat indices
            self._lost = (lost, self.weight.flatten()[lost])
            self.weight.copy_(merged)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take B A back out, e.g. to continue training: W0 comes back bit for bit (see merge), provided A, B,
        the device and the dtype did not change while merged. Unmerging an unmerged layer does nothing."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            lost, values = self._lost
            lost = lost.to(self.weight.device)
            self.weight[lost // self.in_features, lost % self.in_features] = values.to(self.weight)
            del self._lost
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets: tuple[str, ...] = TARGETS,
                rslora: bool = False, trainable: tuple[str, ...] = ("score",)) -> nn.Module:
    """Replace the target projections of every block with LoRALinear, then freeze everything except the
    LoRA matrices and the parameters under the `trainable` prefixes (the classification head)."""
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        raise UserError(f"--lora_targets {','.join(sorted(unknown)) or '(empty)'}: choose from {','.join(TARGETS)}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear) and \
                    any(full == t or full.endswith("." + t) for t in targets):
                setattr(module, child_name, LoRALinear.from_linear(child, r, alpha, dropout, rslora))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(trainable))
    return model


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); tied weights are counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    s = f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    return s + (f", {total / trainable:.0f}x fewer than full fine-tuning" if 0 < trainable < total else "")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only: LoRA matrices and the head. This is what an adapter file holds."""
    return {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def save_adapter(model: nn.Module, out_dir: str | Path, config: dict) -> Path:
    """Write adapter.safetensors (LoRA matrices + head) and adapter_config.json (how to rebuild the model)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(m.merged for m in lora_modules(model).values()):
        raise RuntimeError("save_adapter on a merged model: unmerge first, the adapter must not include W0")
    weights = adapter_state_dict(model)
    tmp = out_dir / (ADAPTER_WEIGHTS + ".tmp")
    save_file({k: v.cpu() for k, v in weights.items()}, str(tmp))
    tmp.replace(out_dir / ADAPTER_WEIGHTS)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir / ADAPTER_WEIGHTS


def read_adapter_config(adapter_dir: str | Path, objective: str = "cls") -> dict:
    """A train_lora.py run's adapter_config.json, refused unless the run was trained with --objective `objective`:
    a classifier ("cls", the default; runs written before the flag existed are classifiers) or a language model
    ("lm", a generator)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{path} not found: train a LoRA teacher first with `python train_lora.py` "
                        f"(its --out_dir holds the adapter)")
    config = json.loads(path.read_text())
    found = config.get("objective", "cls")
    if found != objective:
        what = {"cls": "a classifier", "lm": "a language model (a generator)"}
        raise UserError(f"{adapter_dir} is {what.get(found, repr(found))} (objective {found} in {ADAPTER_CONFIG}), "
                        f"but {what.get(objective, objective)} is needed here: pass a run trained with "
                        f"`python train_lora.py --objective {objective}`")
    return config


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> None:
    """Load adapter weights onto a model that already has LoRA injected with the same config; every
    name and shape must match exactly."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path} not found: train a LoRA teacher first with `python train_lora.py`")
    weights = load_file(str(path))
    expected = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise UserError(f"{path} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    with torch.no_grad():
        for k, v in weights.items():
            expected[k].copy_(v)


def check_base(adapter_dir: str | Path, cfg: dict, base_path: str) -> None:
    """Refuse a base GPT-2 other than the one the adapter was trained on, by the fingerprint the adapter
    recorded (model.base_fingerprint). An adapter written before fingerprints were recorded has none: then only
    the shapes can be checked (build_lora_classifier)."""
    want = cfg.get("base_fingerprint")
    if want is not None and base_fingerprint(base_path) != want:
        raise UserError(f"{Path(adapter_dir) / ADAPTER_CONFIG} was trained on the base {cfg['gpt_variant']}, and "
                        f"{base_path} holds other weights (a different base fingerprint): pass the base it was "
                        "trained on")


def build_lora_classifier(adapter_dir: str | Path, base: nn.Module | None = None, base_path: str | None = None,
                          objective: str = "cls") -> tuple[nn.Module, dict]:
    """Rebuild a fine-tuned classifier from a train_lora.py output directory: the base GPT-2 named in its
    adapter_config.json (or base_path, where it now lives), LoRA injected the same way, and the saved adapter
    loaded. Another base than the one trained on, or other shapes, are refused.

    `base`: that GPT-2, already loaded by the caller (GPT.from_pretrained from base_path, no LoRA), so it is
    not loaded twice; it becomes the classifier (LoRA is injected into it and its head replaced by the
    adapter's). objective "lm": a language-model run instead, whose adapter is LoRA alone (its head is GPT-2's
    own). GPT is imported at the top: model.py never imports this file, so there is no circle."""
    cfg = read_adapter_config(adapter_dir, objective)
    base_path = base_path or cfg["gpt_variant"]
    model = base if base is not None else GPT.from_pretrained(base_path, n_classes=cfg["n_classes"])
    got = {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")}
    want = {k: cfg[k] for k in got}
    if got != want:
        raise UserError(f"{Path(adapter_dir) / ADAPTER_CONFIG} was trained on a base with {want}, but "
                        f"'{base_path}' has {got}")
    check_base(adapter_dir, cfg, base_path)  # the same shapes: are they the same weights?
    inject_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], tuple(cfg["lora_targets"]),
                cfg["rslora"], trainable=("score",) if objective == "cls" else ())
    load_adapter(model, adapter_dir)
    return model, cfg


def export_peft(model: nn.Module, config: dict, out_dir: str | Path) -> Path:
    """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), loadable with
    peft.PeftModel.from_pretrained onto transformers' GPT2ForSequenceClassification over the same base.

    Module names are transformers' already, so each key only gains PEFT's `base_model.model.` prefix and
    `.weight`. PEFT's lora_A (r, in) and lora_B (out, r) are laid out as ours even on GPT-2's Conv1D
    (fan_in_fan_out transposes only the merged product), and `score` goes as a whole module. W0 is never
    written, so a merged model exports the same adapter. `config` is the one save_adapter writes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "base_model.model."
    weights = {}
    for name, m in lora_modules(model).items():
        weights[f"{prefix}{name}.lora_A.weight"] = m.lora_A
        weights[f"{prefix}{name}.lora_B.weight"] = m.lora_B
    for name, p in model.score.named_parameters():
        weights[f"{prefix}score.{name}"] = p
    path = out_dir / "adapter_model.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(path), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": str(config["gpt_variant"]),
        "r": int(config["lora_rank"]), "lora_alpha": float(config["lora_alpha"]),
        "lora_dropout": float(config["lora_dropout"]), "use_rslora": bool(config["rslora"]),
        "target_modules": [str(t) for t in config["lora_targets"]],
        "fan_in_fan_out": True, "bias": "none", "modules_to_save": ["score"],
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return path
