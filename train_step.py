"""One optimisation step of trainer.fit (forward, loss, backward, clip, AdamW), two ways, and the running
training metrics both keep on the device, so that an epoch never waits for the GPU.

- EagerStep: any batch shape, on any device. The default.
- FixedShapeStep (train_lora.py --cuda_graphs): the same step on fixed shapes: always `batch_size` rows, the
  length rounded up to one of a few BUCKETS, the short batch padded with rows labelled IGNORE_INDEX, which the
  loss and the metrics give zero weight. On CUDA each shape is captured once as a CUDA graph and then replayed:
  one launch a step instead of ~3,000 kernels dispatched from Python. All graphs share one memory pool and one
  side stream (CudaGraphs). On CPU it runs eagerly, which is how its logic is tested. It has no loss scaling, so
  it refuses fp16.

Both compute under the run's precision.Precision; the logits and the loss are fp32 whatever it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn

from data import PAD_TOKEN, Batch
from errors import UserError
from optim import clip_grad_norm_
from precision import Precision, store_frozen_weights

IGNORE_INDEX = -100  # label of pad rows: F.cross_entropy's default ignore_index, so they carry zero weight
BUCKETS = (8, 12, 16, 24, 32, 48, 64)  # a CoLA epoch computes 1.27x its real tokens (1.07x padded to the longest)
WARMUP_STEPS = 3  # eager steps on a side stream before a capture, as torch's CUDA-graph recipe asks
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


class RunningMetrics:
    """An epoch's training loss, accuracy, first non-finite loss and steps skipped by the loss scaler, summed on
    the device. update() only queues device work (it is captured into the CUDA graph too); read() waits for the
    device, so fit calls it every few dozen steps and at the end of the epoch."""

    LOSS, ROWS, CORRECT, LABELLED, STEPS, BAD_STEP, BAD_LOSS, SKIPPED = range(8)

    def __init__(self, device: torch.device):
        # float64 counts are exact (MPS has no float64: float32 counts stay exact below 2^24 rows)
        self.sums = torch.zeros(8, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)

    def reset(self) -> None:
        self.sums.zero_()

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, rows: int | torch.Tensor,
               skipped: float | torch.Tensor = 0.0) -> None:
        """loss: the batch's mean loss (0-dim); logits (B, n_classes); labels (B,), negative for rows that
        count in no accuracy (unlabelled -1, pad rows IGNORE_INDEX); rows: the batch's real rows; a language
        model's logits (B, T, vocab), labels (B, T) its next tokens, -1 where none is scored, and rows its
        scored tokens; skipped: 1 if the loss scaler skipped this step (its gradients overflowed), else 0."""
        s, loss = self.sums, loss.detach().to(self.sums.dtype)
        s[self.STEPS].add_(1)
        first_bad = ~torch.isfinite(loss) & (s[self.BAD_STEP] == 0)
        s[self.BAD_STEP] = torch.where(first_bad, s[self.STEPS], s[self.BAD_STEP])
        s[self.BAD_LOSS] = torch.where(first_bad, loss, s[self.BAD_LOSS])
        s[self.LOSS].add_(loss * rows)
        s[self.ROWS].add_(rows)
        s[self.CORRECT].add_((logits.argmax(-1) == labels).sum())  # a negative label never matches
        s[self.LABELLED].add_((labels >= 0).sum())
        s[self.SKIPPED].add_(skipped)

    def read(self) -> dict:
        """{"loss", "acc", "skipped"} so far this epoch, and the first non-finite loss: its step (1-based, 0 if
        none) and value. One host synchronisation."""
        loss, rows, correct, labelled, _, bad_step, bad_loss, skipped = self.sums.tolist()
        return {"loss": loss / max(rows, 1), "acc": correct / max(labelled, 1), "bad_step": int(bad_step),
                "bad_loss": bad_loss, "skipped": int(skipped)}


class EagerStep:
    """The step as PyTorch runs it op by op: any batch shape, any device, any precision.

    fp16 scales the loss (scaler: precision.make_scaler() unless given), unscales the gradients before they
    are clipped, and lets the scaler skip a step whose gradients overflowed and lower its scale. Such a step is
    counted in the metrics (skipped), not treated as a non-finite loss. With fused AdamW (CPU, CUDA) nothing
    waits for the device: the optimizer reads the scaler's found-inf flag on the device."""

    def __init__(self, forward: Callable, loss_fn: LossFn, optimizer: torch.optim.Optimizer, grad_clip: float,
                 metrics: RunningMetrics, device: torch.device, precision: Precision,
                 scaler: torch.amp.GradScaler | None = None):
        self.forward, self.loss_fn, self.optimizer, self.grad_clip = forward, loss_fn, optimizer, grad_clip
        self.metrics, self.device, self.precision = metrics, device, precision
        self.scaler = precision.make_scaler() if scaler is None else scaler
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def __call__(self, batch: Batch) -> None:
        batch = batch.to(self.device)
        with self.precision.autocast():
            logits = self.forward(batch.ids, batch.lengths).float()  # (B, n_classes)
        loss = self.loss_fn(logits, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        skipped = self._unscale()
        if self.grad_clip > 0:
            clip_grad_norm_(self.params, self.grad_clip)  # optim's: takes the sparse gradient of the student's wte
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # The loss is a mean over the batch's rows, or, for a language model (labels (B, T)), over its scored
        # next tokens: the epoch's loss weights each batch by that count.
        weight = batch.labels.size(0) if batch.labels.dim() == 1 else (batch.labels >= 0).sum()
        self.metrics.update(loss, logits, batch.labels, weight, skipped)

    def _unscale(self) -> float | torch.Tensor:
        """With loss scaling: divide the gradients by the scale (so that clipping sees their true norm) and
        return the scaler's flag, a device tensor, 1 if any gradient is inf or nan (scaler.step then skips)."""
        if not self.scaler.is_enabled():
            return 0.0
        self.scaler.unscale_(self.optimizer)
        # The flag unscale_ just computed, per device; GradScaler has no public reader that does not sync.
        return sum(self.scaler._found_inf_per_device(self.optimizer).values())


def bucket_length(length: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket >= length; past the largest, the next multiple of it (GPT-2's 1024 positions are a
    multiple of 64, so a real batch never pads beyond the block size)."""
    for b in buckets:
        if length <= b:
            return b
    return -(-length // buckets[-1]) * buckets[-1]


def pad_batch(batch: Batch, batch_size: int, length: int) -> Batch:
    """batch (B, T) padded to (batch_size, length): extra columns are PAD_TOKEN (right padding, causal
    attention: no real token sees them), extra rows a one-token pad sentence labelled IGNORE_INDEX."""
    B, T = batch.ids.shape
    assert B <= batch_size and T <= length, (batch.ids.shape, batch_size, length)
    ids = torch.full((batch_size, length), PAD_TOKEN, dtype=torch.long)
    ids[:B, :T] = batch.ids
    lengths = torch.ones(batch_size, dtype=torch.long)
    labels = torch.full((batch_size,), IGNORE_INDEX, dtype=torch.long)
    index = torch.zeros(batch_size, dtype=torch.long)
    lengths[:B], labels[:B], index[:B] = batch.lengths, batch.labels, batch.index
    return Batch(ids, lengths, labels, index)


@contextmanager
def tensor_lr(optimizer: torch.optim.Optimizer, lrs: list[torch.Tensor]):
    """While capturing, AdamW (fused, capturable) reads each group's learning rate from a device tensor, which
    CudaGraphs.replay refills from the scheduler's float before every replay; afterwards the groups hold floats
    again, as LambdaLR and the JSON checkpoints expect."""
    saved = [(g["lr"], g["capturable"]) for g in optimizer.param_groups]
    for g, lr in zip(optimizer.param_groups, lrs):
        lr.fill_(g["lr"])
        g["lr"], g["capturable"] = lr, True
    try:
        yield
    finally:
        for g, (lr, capturable) in zip(optimizer.param_groups, saved):
            g["lr"], g["capturable"] = lr, capturable


class CudaGraphs:
    """The CUDA side of FixedShapeStep: one memory pool and one side stream shared by all its graphs (they replay
    one at a time, so one pool holds a single step's intermediates, not one set per bucket), AdamW's learning
    rates as device tensors, and the clean-up a failed capture needs."""

    def __init__(self, device: torch.device, optimizer: torch.optim.Optimizer):
        self.device, self.optimizer = device, optimizer
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)  # warm-up and capture both run here
        self.main = torch.cuda.current_stream(device)  # the stream training runs on, made current again by recover
        self.lrs = [torch.zeros((), device=device) for _ in optimizer.param_groups]

    def capture(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """WARMUP_STEPS eager runs of step on the side stream (they allocate AdamW's state), then one captured."""
        self.main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(self.main)
        with torch.cuda.stream(self.stream):
            for _ in range(WARMUP_STEPS):
                step()
        self.main.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with tensor_lr(self.optimizer, self.lrs), torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            step()
        return graph

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        for lr, g in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(g["lr"])
        graph.replay()

    def recover(self) -> None:
        """Undo what a capture_end that raised left undone, so that eager training can go on; raise if it cannot.

        torch.cuda.graph's __exit__ calls capture_end, which raises at cudaStreamEndCapture when an op failed during
        capture, before the rest of its work (ATen's CUDAGraph::capture_end, torch 2.9-2.13):
        - the side stream stays current (the stream context is never exited): set the main stream back;
        - the allocator keeps the pool among its captures underway: no allocation is routed to it once no stream
          captures, but it defers freeing cross-stream blocks while any capture is underway, and a new capture
          into the pool is refused. torch._C._cuda_endAllocateToPool and _cuda_releasePool are what capture_end
          and the graph's reset would have called (torch.cuda.use_mem_pool and inductor's CUDA-graph trees call
          the same pair). If capture_end got past them itself, endAllocateToPool raises and there is nothing to
          undo. The pinned-memory allocator's twin has no Python binding; it routes only from capturing streams
          and eager training pins nothing, so it stays as it is;
        - on torch <= 2.10 the default CUDA generator stays in capture mode (its capture_epilogue never ran) and
          the next eager dropout raises "Offset increment outside graph capture". A capture that ends well runs
          the epilogue: one tiny capture does it (from 2.11 the generator keys capture state by capture id and
          needs nothing; the tiny capture is harmless there).
        Then one random draw, as the next dropout will make, proves the generator usable.
        """
        torch.cuda.set_stream(self.main)
        try:
            torch._C._cuda_endAllocateToPool(self.index, self.pool)
        except RuntimeError:  # "not currently recording to mempool_id": capture_end ended it itself
            pass
        else:
            torch._C._cuda_releasePool(self.index, self.pool)
        flag = torch.zeros((), device=self.device)
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=self.stream):
            flag.add_(1)  # not empty: an empty capture warns
        torch.rand(4, device=self.device)
        torch.cuda.synchronize(self.device)


class FixedShapeStep:
    """The whole step on fixed shapes, one CUDA graph per length bucket (graphs=True, CUDA), or eagerly.

    Each bucket has a static device buffer; a batch is padded on the CPU and copied into it, then the bucket's
    graph is replayed. The first batch of a bucket captures its graph (CudaGraphs.capture: eager warm-up steps,
    then one captured step); the weights, optimizer state and metrics those steps moved are put back, so
    capturing does not train. Gradients are allocated once, outside any graph, and zeroed in place, so every
    graph and the optimizer share them. Dropout draws from the default CUDA generator, which every capture
    registers (torch advances its offset by the graph's total at each replay). If a capture fails, one line gives
    the real cause, the graphs are dropped and training continues eagerly on the same shapes; if CUDA cannot be
    brought back to a usable state for that, the run stops with one line saying to rerun without --cuda_graphs.

    The loss must give rows labelled IGNORE_INDEX zero weight (F.cross_entropy does by default). Pad rows go
    through the model, so gradients are exactly those of the real rows: padding changes only the shapes.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, grad_clip: float,
                 batch_size: int, metrics: RunningMetrics, device: torch.device, precision: Precision, graphs: bool,
                 buckets: tuple[int, ...] = BUCKETS):
        if precision.loss_scaling:
            raise ValueError("FixedShapeStep has no loss scaling: train fp16 with EagerStep")
        self.model, self.loss_fn, self.optimizer, self.grad_clip = model, loss_fn, optimizer, grad_clip
        self.batch_size, self.metrics, self.device, self.buckets = batch_size, metrics, device, buckets
        self.precision = precision
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            for p in self.params:
                p.grad = torch.zeros_like(p)  # static: backward accumulates into it in place
        self.buffers: dict[int, torch.Tensor] = {}  # bucket length -> (batch_size, length + 3) int64
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cuda_graphs = CudaGraphs(device, optimizer) if graphs and device.type == "cuda" else None
        if self.cuda_graphs:
            store_frozen_weights(model, precision.dtype)

    def __call__(self, batch: Batch) -> None:
        length = bucket_length(batch.ids.size(1), self.buckets)
        p = pad_batch(batch, self.batch_size, length)
        host = torch.cat([p.ids, p.lengths[:, None], p.labels[:, None], p.index[:, None]], dim=1)  # one copy
        if length not in self.buffers:
            self.buffers[length] = torch.empty_like(host, device=self.device)
        buf, pinned = self.buffers[length], self.device.type == "cuda" and self.cuda_graphs is not None
        buf.copy_(host.pin_memory() if pinned else host, non_blocking=pinned)
        static = Batch(buf[:, :length], buf[:, length], buf[:, length + 1], buf[:, length + 2])
        if self.cuda_graphs and length not in self.graphs:
            self._capture(length, static)
        if length in self.graphs:
            self.cuda_graphs.replay(self.graphs[length])
        else:
            self._step(static)

    def _step(self, static: Batch) -> None:
        """Device work only, nothing read back to the host: what a graph captures."""
        with self.precision.autocast(cache=False):
            logits = self.model.classify(static.ids, static.lengths).float()  # (batch_size, n_classes)
        loss = self.loss_fn(logits, static)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.metrics.update(loss, logits, static.labels, (static.labels != IGNORE_INDEX).sum())

    def _capture(self, length: int, static: Batch) -> None:
        saved = self._snapshot()
        try:
            self.graphs[length] = self.cuda_graphs.capture(lambda: self._step(static))
        except Exception as e:  # whatever the cause, training goes on without graphs if CUDA allows it
            # capture_end's own error ("operation failed due to a previous error during capture") is raised while
            # the real one propagates: that one is its __context__
            cause = e.__context__ or e
            reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:160]}"
            cuda_graphs, self.cuda_graphs = self.cuda_graphs, None
            self.graphs.clear()
            try:
                cuda_graphs.recover()
            except Exception as broken:
                raise UserError(f"--cuda_graphs: capturing the {length}-token step failed ({reason}) and CUDA "
                                f"could not be restored for eager training ({type(broken).__name__}: "
                                f"{(str(broken).strip().splitlines() or [''])[0][:120]}); rerun without "
                                "--cuda_graphs") from None
            print(f"--cuda_graphs: capturing the {length}-token step failed ({reason}); the graphs are dropped "
                  "and training continues eagerly")
        self._restore(saved)

    def _snapshot(self) -> tuple:
        state = {p: {k: v.clone() for k, v in self.optimizer.state[p].items()} for p in self.params
                 if p in self.optimizer.state}
        return [p.detach().clone() for p in self.params], state, self.metrics.sums.clone()

    @torch.no_grad()
    def _restore(self, saved: tuple) -> None:
        params, state, sums = saved
        for p, v in zip(self.params, params):
            p.copy_(v)
        for p in self.params:  # AdamW state the warm-up created starts from zero, as a fresh state does
            for k, v in self.optimizer.state.get(p, {}).items():
                v.copy_(state[p][k]) if p in state else v.zero_()
        self.metrics.sums.copy_(sums)
