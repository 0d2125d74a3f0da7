"""GPT-2 in one file, nanoGPT-style, plus the DistilRNN student that is distilled from it.

Module names match the Hugging Face GPT-2 state dict (transformer.wte, transformer.h.0.attn.c_attn, ...),
so pretrained weights load key for key; the four Conv1D weights are transposed on load because HF stores
them as (in, out) while nn.Linear stores (out, in). Loading needs neither transformers nor a random init:
the model is built on the meta device and the checkpoint's tensors become its parameters.

Run it to generate text:  python model.py --gpt_variant gpt2 --prompt "The cat"
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from cli import ArgumentParser, check_inputs, nonneg_float, pick_device, positive_int, run_cli, unit_float
from data import get_encoder
from errors import OFFLINE_HINT, UserError
from precision import autocast_off

# Hub names and their shapes (n_layer, n_head, n_embd): the checkpoints GPT.from_pretrained downloads.
HUB_VARIANTS = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
EOT_TOKEN = 50256  # <|endoftext|>; also our padding token (right padding never reaches a real token)
DEFAULT_VARIANT = "gpt2-medium"  # the base train_distil.py falls back to; train_lora.py's --gpt_variant default too
# HF GPT-2 Conv1D weights are (in, out); ours are nn.Linear (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Where a checkpoint keeps its weights, by preference; each may also be sharded, listed in NAME.index.json.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# transformers' GPT2Config defaults, for the keys a config.json leaves out.
GPT2_DEFAULTS = dict(n_positions=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, layer_norm_epsilon=1e-5,
                     activation_function="gelu_new", scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                     reorder_and_upcast_attn=False, n_inner=None)
HUB_TIMEOUT = 5.0  # seconds for the one request that tells whether the hub is reachable
# One layer's key/value cache for incremental decoding: keys and values, (B, n_head, T_max, head size) each.
KV = tuple[torch.Tensor, torch.Tensor]
# The files of a trained student (train_distil.py): DistilRNN(**config) and its weights.
STUDENT_WEIGHTS = "student.safetensors"
STUDENT_CONFIG = "student_config.json"


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    n_classes: int = 2


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads, in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, query_idx: torch.Tensor | None = None, kv: KV | None = None,
                pos: int = 0) -> torch.Tensor:
        """x: (B, T, C). With query_idx (B,), only the row at that position of each sequence is computed,
        attending to positions <= query_idx; the output is then (B, 1, C).

        With kv (incremental decoding), x holds positions pos .. pos + T - 1 only: their keys and values are
        written into the cache after the pos positions already there, and each query attends to every cached
        position up to its own."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if kv is not None:
            k_cache, v_cache = kv  # (B, nh, T_max, hs) each
            k_cache[:, :, pos:pos + T] = k
            v_cache[:, :, pos:pos + T] = v
            k, v = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]  # (B, nh, pos + T, hs)
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            # query i (position pos + i) sees keys 0 .. pos + i; one new token sees them all
            mask = None if T == 1 or pos == 0 else torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pos == 0 and T > 1)
        elif query_idx is None:
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            rows = torch.arange(B, device=x.device)
            q = q[rows, query_idx].view(B, 1, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, 1, hs)
            visible = torch.arange(T, device=x.device)[None, :] <= query_idx[:, None]  # (B, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, -1, C)  # (B, T or 1, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, query_idx: torch.Tensor | None = None, kv: KV | None = None,
                pos: int = 0) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or (B, 1, C) holding only the query_idx rows when it is given. kv, pos:
        incremental decoding (CausalSelfAttention.forward)."""
        if query_idx is None:
            x = x + self.attn(self.ln_1(x), kv=kv, pos=pos)
        else:
            x = x[torch.arange(x.size(0), device=x.device), query_idx].unsqueeze(1) + self.attn(self.ln_1(x), query_idx)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 with a language-model head (tied to wte) and a sequence-classification head (`score`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        # Named and shaped like transformers' GPT2ForSequenceClassification.score, so adapters export to PEFT.
        self.score = nn.Linear(config.n_embd, config.n_classes, bias=False)
        if self.score.weight.is_meta:
            return  # from_pretrained: the checkpoint provides the weights
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _embed(self, idx: torch.Tensor, pos: int = 0) -> torch.Tensor:
        """idx (B, T), the tokens at positions pos .. pos + T - 1 -> (B, T, C)"""
        T = idx.size(1)
        if pos + T > self.config.block_size:
            raise UserError(f"sequence of {pos + T} tokens exceeds the model's block size {self.config.block_size}")
        positions = torch.arange(pos, pos + T, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Language modelling. idx (B, T) -> logits (B, T, vocab), and the next-token loss if targets are given
        (targets (B, T), -1 where nothing is scored)."""
        x = self._embed(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def classify(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Classification from the hidden state of the last real token. idx (B, T) right-padded, lengths (B,)
        -> logits (B, n_classes).

        Only the pooled token reaches the head, so the last block computes its attention output and MLP
        for that one position; the LM head is never run.
        """
        x = self._embed(idx)
        for block in self.transformer.h[:-1]:
            x = block(x)
        x = self.transformer.h[-1](x, query_idx=lengths.to(idx.device, non_blocking=True) - 1)  # (B, 1, C)
        with autocast_off(idx.device.type):  # the head in fp32: the logits are fp32, not bf16-rounded
            return self.score(self.transformer.ln_f(x[:, 0].float()))  # (B, n_classes)

    def decode(self, idx: torch.Tensor, kv: list[KV], pos: int) -> torch.Tensor:
        """One step of incremental decoding: idx (B, T), the tokens at positions pos .. pos + T - 1, whose
        keys and values are appended to the cache kv (one KV a layer, holding positions 0 .. pos - 1) ->
        next-token logits (B, vocab) after the last of them. Only the new positions are computed."""
        x = self._embed(idx, pos)  # (B, T, C)
        for block, layer_kv in zip(self.transformer.h, kv):
            x = block(x, kv=layer_kv, pos=pos)
        return self.lm_head(self.transformer.ln_f(x[:, -1]))  # (B, vocab)

    def empty_cache(self, batch_size: int, length: int, device: torch.device, dtype: torch.dtype) -> list[KV]:
        """A key/value cache for batch_size sequences of up to `length` positions: one KV a layer."""
        c = self.config
        shape = (batch_size, c.n_head, length, c.n_embd // c.n_head)  # (B, nh, T_max, hs)
        return [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
                for _ in range(c.n_layer)]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 eos_token: int | None = None) -> torch.Tensor:
        """Append max_new_tokens tokens to every row of idx (B, T) -> (B, T + max_new_tokens). temperature == 0
        is greedy decoding; otherwise the logits are divided by temperature, cut to the top_k tokens, then to the
        nucleus (the fewest most likely tokens holding top_p of the probability), and sampled from `generator`.

        Incremental decoding: the prompts are run once, then each step runs only the tokens just chosen, their
        keys and values appended to a cache, as transformers' generate does. A row that emits eos_token keeps
        it from then on (callers cut at the first eos after the prompt) and leaves the batch: its cache rows are
        dropped, so later steps compute only unfinished rows, and decoding ends when no row is left.

        Frozen weights stored in bf16 or fp16 (precision.store_frozen_weights) are run under that dtype's
        autocast; fp32 weights run in fp32, as they are."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise UserError(f"{T} prompt tokens + {max_new_tokens} new tokens exceed the model's block size "
                            f"{self.config.block_size}")
        out = torch.cat([idx, idx.new_full((B, max_new_tokens), EOT_TOKEN if eos_token is None else eos_token)], 1)
        rows = torch.arange(B, device=idx.device)  # the rows of out still being decoded
        dtype = self.transformer.h[0].attn.c_attn.weight.dtype
        with torch.autocast(idx.device.type, dtype=dtype, enabled=dtype != torch.float32):
            kv = self.empty_cache(B, T + max_new_tokens, idx.device, dtype)
            logits = self.decode(idx, kv, 0)  # (B, vocab)
            for t in range(max_new_tokens):
                idx_next = next_token(logits.float(), temperature, top_k, top_p, generator)  # (b,)
                out[rows, T + t] = idx_next
                if eos_token is not None:
                    going = idx_next != eos_token  # (b,)
                    if not going.all():
                        if not going.any():
                            break
                        rows, idx_next = rows[going], idx_next[going]
                        kv = [(k[going], v[going]) for k, v in kv]
                if t + 1 < max_new_tokens:
                    logits = self.decode(idx_next[:, None], kv, T + t)
        return out

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: float = 0.0, n_classes: int = 2) -> GPT:
        """Load GPT-2 weights from a hub name (downloaded once into the Hugging Face cache) or from a local
        directory holding a transformers GPT-2 checkpoint.

        The model is built on the meta device and the checkpoint's tensors become its parameters: a
        safetensors file is mapped into memory, so a weight costs memory once it is read, and only once; the
        Conv1D weights become transposed views. Nothing is initialised randomly but the new `score` head,
        N(0, 0.02) from the global RNG: it follows torch.manual_seed, and that draw is the only one, so the
        RNG moves by exactly score.weight.numel() normal samples.
        """
        check_variant(name_or_path)
        config_file, weight_files = checkpoint_files(name_or_path)
        c = {**GPT2_DEFAULTS, **json.loads(config_file.read_text())}
        unsupported = [name for name, ok in [
            ("activation_function", c["activation_function"] == "gelu_new"),
            ("scale_attn_weights", c["scale_attn_weights"]),
            ("scale_attn_by_inverse_layer_idx", not c["scale_attn_by_inverse_layer_idx"]),
            ("reorder_and_upcast_attn", not c["reorder_and_upcast_attn"]),
            ("n_inner", c["n_inner"] in (None, 4 * c["n_embd"])),
        ] if not ok]
        if unsupported:
            raise UserError(f"'{name_or_path}' uses GPT-2 options this model does not implement: {', '.join(unsupported)}")
        config = GPTConfig(block_size=c["n_positions"], vocab_size=c["vocab_size"], n_layer=c["n_layer"],
                           n_head=c["n_head"], n_embd=c["n_embd"], layer_norm_epsilon=c["layer_norm_epsilon"],
                           dropout=dropout, n_classes=n_classes)
        with torch.device("meta"):
            model = cls(config)
        sd = read_weights(weight_files)
        tensors = {}
        for k, v in model.state_dict().items():
            if k.startswith("score.") or k == "lm_head.weight":
                continue  # the head is new; lm_head is tied to wte
            src = sd.get(k, sd.get(k.removeprefix("transformer.")))  # GPT2LMHeadModel's names, or GPT2Model's
            if src is None:
                raise UserError(f"{weight_files[0]} holds no {k}: not a GPT-2 checkpoint")
            src = src.t() if k.endswith(CONV1D_SUFFIXES) else src
            if src.shape != v.shape:
                raise UserError(f"{weight_files[0]}: {k} has shape {tuple(src.shape)}, but config.json implies "
                                f"{tuple(v.shape)}")
            tensors[k] = src.float()  # a no-op for float32 checkpoints
        model.load_state_dict(tensors, strict=False, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign replaced the tied Parameter
        model.score.to_empty(device="cpu")
        nn.init.normal_(model.score.weight, mean=0.0, std=0.02)
        return model


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, vocab) float32 -> the next token of each row (B,): the argmax if temperature == 0, otherwise
    a draw from `generator` among the sampling candidates."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits, ids = candidates(logits, temperature, top_k, top_p)
    choice = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)  # (B, 1)
    return (choice if ids is None else ids.gather(1, choice))[:, 0]


def candidates(logits: torch.Tensor, temperature: float, top_k: int | None = None,
               top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What is sampled from: logits (B, vocab) / temperature, cut to the top_k tokens, then to the nucleus top_p
    (the fewest most likely tokens holding top_p of the probability), in the order of transformers' logits
    warpers, so the same settings sample from the same distribution. Returns the candidates' logits (B, n), -inf
    for those cut, and their tokens (B, n), or None when candidate i is token i (no cut at all).

    Only the candidates are sorted: the k of top_k (torch.topk returns them sorted), or, with top_p alone, the
    whole vocabulary."""
    logits = logits / temperature
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k)  # (B, k), most likely first
    if top_p is not None and top_p < 1:
        if ids is None:
            logits, ids = torch.sort(logits, dim=-1, descending=True)  # (B, vocab)
        probs = F.softmax(logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the probability of the candidates more likely than each
        logits = logits.masked_fill(before >= top_p, -float("inf"))  # the nucleus: kept until top_p is reached
    return logits, ids


def variant_id(name_or_path: str) -> str:
    """How a run records its base: a hub name as given, a directory as its absolute path."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else name_or_path


def check_variant(name_or_path: str) -> None:
    """Refuse, cheaply and before any download, a name that is neither a hub GPT-2 nor a GPT-2 directory."""
    path = Path(name_or_path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{path} holds no config.json: it is not a transformers checkpoint directory")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != "gpt2":
            raise UserError(f"{path} holds a '{model_type}' checkpoint, not GPT-2 (config.json model_type)")
    elif name_or_path not in HUB_VARIANTS:
        raise UserError(f"--gpt_variant '{name_or_path}' is neither a directory nor one of {', '.join(HUB_VARIANTS)}"
                        f"{OFFLINE_HINT}")


def find_weights(name_or_path: str) -> None:
    """Fail now, before other work, if a GPT-2's weights cannot be had (from the directory, the Hugging Face
    cache, or a download, which then also happens now)."""
    check_variant(name_or_path)
    checkpoint_files(name_or_path)


def checkpoint_files(name_or_path: str) -> tuple[Path, list[Path]]:
    """config.json and the weight files of a checked (check_variant) local directory or hub name."""
    path = Path(name_or_path)
    if not path.is_dir():
        return hub_files(name_or_path)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / "config.json", [path / name]
        index = path / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError):
                raise UserError(f"{index} is not a checkpoint index (a JSON weight_map)") from None
            return path / "config.json", [path / shard for shard in shards]
    raise UserError(f"{path} holds no {' or '.join(WEIGHT_FILES)}: it has a config.json but no weights")


FINGERPRINT_SLICE = 1 << 16  # bytes read at each of three places of each weight file


def base_fingerprint(name_or_path: str) -> str:
    """Identifies a GPT-2's exact weights, cheaply: each weight file's size and a SHA-256 of three 64 KiB slices
    of it (its start, middle and end: tensor data, where two checkpoints of one shape differ), not a hash of the
    whole file (1.4 GB for gpt2-medium). A LoRA adapter records its base's, so that it is never loaded onto
    another GPT-2 of the same shape (it would run, and predict something else)."""
    h = hashlib.sha256()
    for path in checkpoint_files(name_or_path)[1]:
        size = path.stat().st_size
        h.update(f"{size}:".encode())
        with open(path, "rb") as f:
            for offset in (0, size // 2, max(0, size - FINGERPRINT_SLICE)):
                f.seek(offset)
                h.update(f.read(FINGERPRINT_SLICE))
    return h.hexdigest()[:16]


def hub_files(name: str) -> tuple[Path, list[Path]]:
    """config.json and the weights of a hub GPT-2: from the Hugging Face cache when they are there (no
    network), otherwise downloaded once one short request has shown the hub reachable. huggingface_hub
    alone would retry an unreachable hub for about a minute before failing."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(name, filename)
        return Path(found) if isinstance(found, str) else None

    config, weights = cached("config.json"), next(filter(None, map(cached, WEIGHT_FILES)), None)
    if config and weights:
        return config, [weights]
    if constants.HF_HUB_OFFLINE:
        raise hub_error(name, "it is not in the Hugging Face cache, and HF_HUB_OFFLINE is set", offline=True)
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=HUB_TIMEOUT)  # one request, no retries
        config = Path(hf_hub_download(name, "config.json", etag_timeout=HUB_TIMEOUT))
        for filename in WEIGHT_FILES:
            try:
                return config, [Path(hf_hub_download(name, filename, etag_timeout=HUB_TIMEOUT))]
            except EntryNotFoundError:
                continue
        raise hub_error(name, f"the hub repository holds no {' or '.join(WEIGHT_FILES)}")
    except UserError:
        raise
    except Exception as e:  # whatever the network or the hub said (DNS, refused, timed out, HTTP 5xx): one line
        raise hub_error(name, f"it is not in the Hugging Face cache, and the hub did not answer ({first_line(e)})")


def hub_error(name: str, why: str, offline: bool = False) -> UserError:
    """offline: HF_HUB_OFFLINE is already set, so the message does not advise setting it."""
    cache = ("" if offline else "; or, with the weights in the Hugging Face cache, set HF_HUB_OFFLINE=1 so that "
             "the network is never tried")
    return UserError(f"could not load GPT-2 weights '{name}': {why}. Offline, pass a local directory instead: "
                     "--gpt_variant /path/to/checkpoint (made by transformers' save_pretrained, or a copy of the "
                     f"hub's files){cache}{OFFLINE_HINT}")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor in the checkpoint's weight files, read once. safetensors maps the file (copy-on-write:
    writing a weight never changes the file); a pytorch_model.bin is unpickled with weights_only, and mapped
    likewise when it is in torch's zip format."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                part = load_file(str(f))
            else:
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as e:  # a file that is no checkpoint fails in many ways: safetensors, zip, unpickling, I/O
            raise UserError(f"{f} could not be read as a checkpoint ({first_line(e)})") from None
        if not isinstance(part, dict):
            raise UserError(f"{f} holds a {type(part).__name__}, not a state dict of tensors")
        sd.update(part)
    return sd


class DistilRNN(nn.Module):
    """A small recurrent classifier over GPT-2 tokens: embedding -> RNN/GRU/LSTM -> linear.

    It reads the final state of each *real* sequence (sequences are packed by length), never a padding
    step, so a sentence's prediction does not depend on what it is batched with.
    """

    CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(self, vocab_size: int = 50257, embd_dim: int = 768, hidden_size: int = 256, num_layers: int = 1,
                 cell: str = "gru", bidirectional: bool = True, dropout: float = 0.2, n_classes: int = 2):
        super().__init__()
        if cell not in self.CELLS:
            raise UserError(f"--cell '{cell}' is not one of {', '.join(self.CELLS)}")
        self.config = dict(vocab_size=vocab_size, embd_dim=embd_dim, hidden_size=hidden_size, num_layers=num_layers,
                           cell=cell, bidirectional=bidirectional, dropout=dropout, n_classes=n_classes)
        self.wte = nn.Embedding(vocab_size, embd_dim)
        self.rnn = self.CELLS[cell](embd_dim, hidden_size, num_layers=num_layers, batch_first=True,
                                    bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), n_classes)

    def classify(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """idx (B, T) right-padded, lengths (B,), best on the host (data.Batch.to keeps them there) -> logits
        (B, n_classes).

        The whole student runs in fp32 with autocast off, whatever the run's precision: under CUDA autocast a
        packed RNN/GRU/LSTM goes to cuDNN's _cudnn_rnn, whose autocast wrapper (ATen's AutocastRNN.cpp,
        _cudnn_rnn_cast_reflatten) casts to fp16 whatever the autocast dtype, so a bf16 run would train the
        recurrent layer in fp16 with no loss scaling, and small gradients into it and the embedding would
        underflow. The student is small (bench/bench_student_fp32.py measures what fp32 costs)."""
        with autocast_off(idx.device.type):
            x = self.drop(self.wte(idx))  # (B, T, E) fp32
            _, h = self.rnn(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False))
            if isinstance(h, tuple):  # LSTM returns (h_n, c_n)
                h = h[0]
            # h: (num_layers * directions, B, H), in the batch's original order; keep the top layer.
            h = h.view(self.rnn.num_layers, -1, h.size(1), h.size(2))[-1]  # (directions, B, H)
            h = torch.cat(list(h), dim=-1)  # (B, directions * H): forward final state, backward state at step 0
            return self.head(self.drop(h))

    forward = classify


def main() -> None:

    parser = ArgumentParser(description="Generate text with GPT-2.")
    parser.add_argument("--gpt_variant", default="gpt2", help="hub name or local checkpoint directory")
    parser.add_argument("--prompt", default="The meaning of life is", help="text to continue")
    parser.add_argument("--max_new_tokens", type=positive_int, default=50, help="tokens generated per sample")
    parser.add_argument("--temperature", type=nonneg_float, default=0.8,
                        help="divides the logits: < 1 sharper, > 1 flatter, 0 greedy decoding")
    parser.add_argument("--top_k", type=positive_int, default=200,
                        help="sample only among the k most likely tokens; a k of 50257 (the vocabulary) or more "
                             "keeps every token")
    parser.add_argument("--top_p", type=unit_float, default=None,
                        help="then sample only among the fewest most likely tokens holding this much probability "
                             "(nucleus sampling; default: no cut)")
    parser.add_argument("--num_samples", type=positive_int, default=1, help="independent samples to print")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the sampling")
    parser.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    args = parser.parse_args()

    def run() -> None:
        check_inputs({"GPT-2 weights": lambda: find_weights(args.gpt_variant), "tiktoken's BPE files": get_encoder})
        device = pick_device(args.device)
        model = GPT.from_pretrained(args.gpt_variant).to(device).eval()
        enc = get_encoder()  # tiktoken's GPT-2 BPE; one line, not a traceback, when its files cannot be had
        idx = torch.tensor([enc.encode_ordinary(args.prompt)], device=device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        for _ in range(args.num_samples):
            out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator=gen)
            print(enc.decode(out[0].tolist()))
            print("---------------")

    run_cli(run)


if __name__ == "__main__":
    main()
