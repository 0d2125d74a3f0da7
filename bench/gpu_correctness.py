"""The device check's first step: is training right on this device, before anything is timed? Random weights
cannot tell (dev MCC is about 0 whether the gradients are right or not, and Adam hides gradients that were never
unscaled), so each check compares against a reference on one fixed batch of real CoLA, and prints PASS or FAIL
with its numbers:

1. fp32: our logits and LoRA + head gradients against transformers + PEFT (bench/common builds both from the
   same weights, with a random LoRA B so the adapters count), on the same device, dropout off.
2. bf16 and fp16 (scaled, then unscaled): the gradients train_step.EagerStep hands the optimizer, clipped at 1.0
   as train_lora.py clips them, against fp32's on the same batch. The step is the product's own, run with lr 0
   so that the weights stay put. A dropped unscale would clip gradients 2^16 times too large (the scaler
   unscales them later, for Adam, which cannot tell): they come out wrong by a factor, not a rounding.
3. Fitting one batch: FIT_STEPS steps of the product's step on that batch in bf16 and in fp16; the batch's loss
   must fall below FIT_LOSS (it starts near ln 2 = 0.69). A wrong gradient (a flipped sign, a dropped term)
   does not fit it.

    python bench/gpu_correctness.py --device cuda --variant-shape gpt2-medium       # bench/gpu_check.sh's step 1
    python bench/gpu_correctness.py --device cpu --variant-shape tiny               # the same on CPU autocast
                                                                                    # (the fit: fp32 on a CPU)

Exit status 0 when every check passes, 1 otherwise. Tolerances (relative error: the norm of the difference of all
trainable gradients over the norm of the reference's) are set at several times what CPU autocast gives on the
gpt2 shape (bench/RESULTS.md); on a GPU they are unmeasured (no device so far).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from common import (add_args, baseline_logits, build_baseline, build_ours, checkpoint, copy_lora, machine,
                    ours_logits, setup)
from data import Batch, collate, load_cola
from lora import lora_modules
from precision import Precision, store_frozen_weights
from train_step import EagerStep, RunningMetrics
from trainer import make_optimizer

ROWS = 32  # the batch: dev rows 0..31 (real CoLA, both labels)
LOGIT_TOL = 1e-4  # max |logit difference|, fp32 against transformers + PEFT
GRAD_TOL = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 1e-2}  # relative gradient error: vs PEFT (fp32), vs fp32 (others)
FIT_STEPS, FIT_LR, FIT_LOSS = 40, 2e-3, 0.1
CLIP = 1.0  # train_lora.py's --grad_clip


def cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(logits, batch.labels)


def rel_error(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str, float]:
    """‖g - ref‖ / ‖ref‖ over all tensors, and the tensor with the largest own relative error, with it."""
    num = sum(float((grads[k].float() - ref[k].float()).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].float().pow(2).sum()) for k in ref)
    worst = max(ref, key=lambda k: float((grads[k].float() - ref[k].float()).norm() / ref[k].float().norm().clamp(min=1e-30)))
    return (num / max(den, 1e-30)) ** 0.5, worst, float((grads[worst] - ref[worst]).norm() / ref[worst].norm())


def trainable_grads(model: torch.nn.Module, rename=lambda k: k) -> dict[str, torch.Tensor]:
    return {rename(k): p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def peft_name(k: str) -> str:
    """PEFT's name of a trainable tensor -> ours: ...c_attn.lora_A.default.weight -> ...c_attn.lora_A."""
    k = k.removeprefix("base_model.model.")
    for ab in ("lora_A", "lora_B"):
        k = k.replace(f"{ab}.default.weight", ab)
    return k.replace("score.modules_to_save.default.", "score.").replace("score.original_module.", "score.")


def report(name: str, ok: bool, text: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {text}")
    return ok


def check_against_peft(ours, baseline, batch: Batch) -> bool:
    """fp32 logits and gradients of ours and transformers + PEFT on one batch, dropout off."""
    ours.eval(), baseline.eval()
    for m in (ours, baseline):
        m.zero_grad(set_to_none=True)
    a = ours_logits(ours, batch.ids, batch.lengths)
    b = baseline_logits(baseline, batch.ids, batch.lengths)
    diff = (a - b).abs().max().item()
    cross_entropy(a, batch).backward()
    cross_entropy(b, batch).backward()
    g_ours = trainable_grads(ours)
    g_peft = {k: v for k, v in trainable_grads(baseline, peft_name).items() if k in g_ours}
    missing = sorted(set(g_ours) - set(g_peft))
    if missing:
        return report("fp32 vs transformers + PEFT", False, f"no PEFT gradient for {missing[:3]}")
    err, worst, worst_err = rel_error(g_ours, g_peft)
    ok = diff <= LOGIT_TOL and err <= GRAD_TOL["fp32"]
    return report("fp32 vs transformers + PEFT", ok,
                  f"max |logit diff| {diff:.2e} (tol {LOGIT_TOL:.0e}); gradients ({len(g_ours)} tensors) relative "
                  f"error {err:.2e} (tol {GRAD_TOL['fp32']:.0e}; worst {worst} {worst_err:.2e})")


def step_grads(model, batch: Batch, device: torch.device, precision: Precision) -> dict[str, torch.Tensor]:
    """The gradients train_step.EagerStep hands the optimizer (unscaled in fp16, clipped at 1.0), its lr 0."""
    model = copy.deepcopy(model).eval()  # dropout off: the same function in every precision
    store_frozen_weights(model, precision.dtype)  # as train_lora.py stores them
    opt = make_optimizer(model, 0.0, 0.0)
    EagerStep(model.classify, cross_entropy, opt, CLIP, RunningMetrics(device), device, precision)(batch)
    return trainable_grads(model)


def check_precisions(ours, batch: Batch, device: torch.device, names=("bf16", "fp16")) -> bool:
    ref = step_grads(ours, batch, device, Precision("fp32", device.type))
    ok = True
    for name in names:
        err, worst, worst_err = rel_error(step_grads(ours, batch, device, Precision(name, device.type)), ref)
        ok &= report(f"{name} gradients vs fp32", err <= GRAD_TOL[name],
                     f"relative error {err:.2e} (tol {GRAD_TOL[name]:.0e}; worst {worst} {worst_err:.2e})")
    return ok


def check_fit(ours, batch: Batch, device: torch.device, names=("bf16", "fp16"), steps: int | None = None) -> bool:
    steps = FIT_STEPS if steps is None else steps
    ok = True
    for name in names:
        precision = Precision(name, device.type)
        model = copy.deepcopy(ours).train()
        store_frozen_weights(model, precision.dtype)
        metrics = RunningMetrics(device)
        step = EagerStep(model.classify, cross_entropy, make_optimizer(model, FIT_LR, 0.0), CLIP, metrics, device,
                         precision)
        losses = []
        for _ in range(steps):
            metrics.reset()
            step(batch)
            losses.append(metrics.read()["loss"])
        skipped = step.scaler.is_enabled() and metrics.read()["skipped"]
        ok &= report(f"{name} fits one batch", losses[-1] < FIT_LOSS,
                     f"loss {losses[0]:.3f} -> {losses[-1]:.4f} in {steps} steps at lr {FIT_LR:g} (must end "
                     f"below {FIT_LOSS}){'; last step skipped by the scaler' if skipped else ''}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--fit-steps", type=int, default=FIT_STEPS,
                   help="steps of check 3; 0 skips it (gpu_check.sh --dry-run: a loaded CPU is too slow for it)")
    args = p.parse_args()
    device, _ = setup(args)
    print(machine())
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on Ampere and later: the reference
    torch.backends.cudnn.allow_tf32 = False
    ckpt = checkpoint(args.variant_shape, args.cache_dir)
    ours = build_ours(ckpt, args.seed)
    baseline = build_baseline(ckpt, ours)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.normal_(0, 0.02)  # the adapters contribute, and A gets a gradient
    copy_lora(ours, baseline)
    ours.to(device), baseline.to(device)
    batch = collate(load_cola(args.data_dir)["dev"], list(range(ROWS))).to(device)
    print(f"batch: dev rows 0-{ROWS - 1}, {tuple(batch.ids.shape)} tokens, {int(batch.labels.sum())} labelled 1; "
          f"{args.variant_shape} shape, random weights, LoRA B random")
    ok = check_against_peft(ours, baseline, batch)
    del baseline
    ok &= check_precisions(ours, batch, device)
    if args.fit_steps == 0:
        print("fitting one batch: not run (--fit-steps 0)")
    else:  # on a CPU in fp32, the check's logic: CPU autocast emulates fp16 (minutes), and bf16 is slow there
        ok &= check_fit(ours, batch, device, ("bf16", "fp16") if device.type == "cuda" else ("fp32",), args.fit_steps)
    print("correctness:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
