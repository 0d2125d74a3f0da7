"""AdamW that also takes sparse gradients, and gradient clipping that does too.

The student's token embedding (50257 x 1024, 51M parameters) sees ~300 distinct tokens a batch. With a dense
gradient, every step writes, clips and AdamW-updates all 51M entries; with nn.Embedding(sparse=True) the
gradient holds only the rows seen, and Adam updates only those rows ("lazy" Adam, as torch.optim.SparseAdam):
a CPU step of the student is 3-4x faster (bench/bench_student.py). Every dense parameter still gets
torch.optim.AdamW's own update, bit for bit.
"""

from __future__ import annotations

import math

import torch


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW for dense gradients; for a sparse gradient, Adam on the rows it holds only.

    A row's update is AdamW's formula with the parameter's global step count (SparseAdam's bias correction):
    a row seen at every step moves exactly as under AdamW. Rows not in the gradient keep their values and their
    moments: unlike AdamW, their momentum does not carry them on and their moments do not decay. Sparse
    parameters take no weight decay (decay of unseen rows is exactly what this update avoids) and a group holding
    one must have weight_decay 0. A GradScaler's grad_scale and found_inf (set for fused AdamW) are honoured.

    state_dict() stores a lazily updated parameter's moments for the rows ever seen only, with their indices
    ("rows"); the rest are exactly zero and load_state_dict() refills them, so a resumed run is unchanged.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.lazy: set[torch.Tensor] = set()  # parameters updated lazily (here, or before a resume)

    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        sparse = {p: p.grad for g in self.param_groups for p in g["params"] if p.grad is not None and p.grad.is_sparse}
        for p in sparse:
            p.grad = None  # AdamW skips parameters without a gradient
        try:
            super().step()
        finally:
            for p, grad in sparse.items():
                p.grad = grad
        if sparse:
            self._lazy_step(sparse)

    @torch.no_grad()
    def _lazy_step(self, sparse: dict[torch.Tensor, torch.Tensor]) -> None:
        """No float64 tensor (MPS has none) and no host sync of its own: a GradScaler's inf/nan flag makes the
        step a no-op on the device (as fused AdamW does), instead of being read on the host. Sparse coalesce()
        still reads its row count on the host (one sync on CUDA, as it was)."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p not in sparse:
                    continue
                if group["weight_decay"] != 0 or group["amsgrad"] or group["maximize"]:
                    raise ValueError("a sparse gradient needs a group with weight_decay 0, no amsgrad, no maximize")
                grad = sparse[p].coalesce()  # duplicate rows (a token seen twice) summed, as in the dense gradient
                rows, values = grad.indices()[0], grad.values()  # (n,), (n, D)
                if grad_scale is not None:
                    values = values / grad_scale
                state = self.state[p]
                self.lazy.add(p)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                skip = None if found_inf is None else found_inf.to(p.device, torch.bool)  # 0-dim: skip this step
                state["step"] += 1 if skip is None else (~skip).to(state["step"].dtype)
                m0, v0 = state["exp_avg"].index_select(0, rows), state["exp_avg_sq"].index_select(0, rows)  # (n, D)
                m = m0.lerp(values, 1 - beta1)
                v = v0.mul(beta2).addcmul_(values, values, value=1 - beta2)
                bias1, bias2 = bias_correction(beta1, state["step"]), bias_correction(beta2, state["step"])
                update = m / (v.sqrt() / bias2.sqrt()).add_(group["eps"]) * (-group["lr"] / bias1)  # (n, D)
                if skip is not None:  # the moments and the row stay as they were (step 0 gives 0/0: discarded)
                    m, v, update = m.where(~skip, m0), v.where(~skip, v0), update.where(~skip, 0.0)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                p.index_add_(0, rows, update)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, st in sd["state"].items():
            if params[pid] in self.lazy:
                seen = ((st["exp_avg"] != 0) | (st["exp_avg_sq"] != 0)).flatten(1).any(1)
                rows = seen.nonzero().squeeze(1)  # (n,)
                sd["state"][pid] = {**st, "rows": rows, "exp_avg": st["exp_avg"][rows],
                                    "exp_avg_sq": st["exp_avg_sq"][rows]}  # a copy: st is the live state
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        state = {}
        for pid, st in state_dict["state"].items():
            if "rows" in st:
                p, rows = params[ids.index(pid)], st["rows"].long().cpu()
                st = {k: v for k, v in st.items() if k != "rows"}
                for k in ("exp_avg", "exp_avg_sq"):
                    st[k] = torch.zeros(p.shape, dtype=st[k].dtype).index_copy_(0, rows, st[k].cpu())
                self.lazy.add(p)
            state[pid] = st
        super().load_state_dict({**state_dict, "state": state})


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, which cannot take sparse gradients, also for them: a sparse gradient is
    coalesced (duplicate rows summed, as in its dense form) and counts by its values, so the norm and the scaling
    are the dense gradient's. Without sparse gradients, torch's own function."""
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p in sparse:
        p.grad = p.grad.coalesce()
    tensors = [p.grad.values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))  # the 2-norm
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's formula
    for t in tensors:
        t.mul_(coef.to(t.device))
    return total


def bias_correction(beta: float, step: torch.Tensor) -> torch.Tensor:
    """Adam's 1 - beta^step, in step's dtype (float32: MPS has no float64), as -expm1(step * log(beta)): log(beta)
    is taken in float64 on the host, and expm1 keeps its relative accuracy where 1 - beta^step is small (beta2 =
    0.999 at step 1 gives 0.001); float32's pow, then 1 - x, would lose 4-5 digits there. Within 1e-6 (relative)
    of the float64 formula for steps 1 to 2^24 (tests/test_optim.py)."""
    return torch.expm1(step * math.log(beta)).neg_()
