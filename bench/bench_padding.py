"""How much of an epoch's compute goes to padding: our batching against the usual alternatives, on real CoLA.

    python bench/bench_padding.py                  # batch size 32, training set averaged over 5 epochs

- ours, training: data.batch_rows(shuffle=True): shuffled, sorted by length within pools of batches, each batch
  padded to its longest sentence (what train_lora.py and train_distil.py use);
- ours, evaluation: data.batch_rows(shuffle=False): sorted by length (metrics.predict_logits);
- random batches padded to their longest sentence (a plain shuffled DataLoader with a padding collate);
- fixed length 20, what public CoLA solutions commonly use: every batch is 20 tokens wide, and longer sentences
  are truncated (their lost tokens and count are shown; they change the input, not only the cost).

A model's cost is nearly proportional to the padded tokens it processes, so "work" (padded tokens relative to
ours) is the cost of an epoch relative to ours. Nothing here runs a model: it takes seconds.
"""

from __future__ import annotations

import argparse
import random
import statistics

from common import DEFAULT_DATA, machine, table
from data import batch_rows, load_cola

FIXED = 20


def stats(lengths: list[int], batches: list[list[int]], width: int | None = None) -> dict:
    """Real and padded tokens of one epoch of `batches`, padded to their longest row or to `width` (truncating)."""
    real = sum(min(lengths[i], width or lengths[i]) for b in batches for i in b)
    padded = sum(len(b) * (width or max(lengths[i] for i in b)) for b in batches)
    lost = sum(max(lengths[i] - width, 0) for b in batches for i in b) if width else 0
    cut = sum(lengths[i] > width for b in batches for i in b) if width else 0
    return {"real": real, "padded": padded, "lost": lost, "cut": cut}


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def mean_stats(runs: list[dict]) -> dict:
    return {k: statistics.mean(r[k] for r in runs) for k in runs[0]}


def rows_for(strategies: dict, ours: str) -> list[list[str]]:
    base = strategies[ours]["padded"]
    out = []
    for label, s in strategies.items():
        out.append([label, f"{s['padded']:,.0f}", f"{s['real']:,.0f}", f"{1 - s['real'] / s['padded']:.1%}",
                    f"{s['padded'] / base:.2f}x",
                    f"{s['cut']:.0f} ({s['lost']:,.0f} tokens)" if "fixed" in label else "0"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5, help="shuffled strategies are averaged over this many epochs")
    p.add_argument("--seed", type=int, default=1337, help="epoch e uses seed + e, as trainer.fit does")
    args = p.parse_args()
    data = load_cola(args.data_dir)
    bs, seeds = args.batch_size, [args.seed + e for e in range(1, args.epochs + 1)]
    print(f"# {machine()}\n# python bench/bench_padding.py --batch-size {bs} --epochs {args.epochs} --seed {args.seed}\n")

    header = ["batching", "padded tokens / epoch", "real tokens", "padding", "work vs ours", "sentences truncated"]
    for split in ("train", "dev"):
        ds = data[split]
        lengths = [max(len(x), 1) for x in ds.ids]  # data.collate gives an empty sentence one pad token
        epochs = seeds if split == "train" else seeds[:1]
        strategies = {}
        if split == "train":
            strategies["ours, length-bucketed (training)"] = mean_stats([stats(lengths, batch_rows(lengths, bs, True, s))
                                                                         for s in epochs])
        strategies.update({
            "ours, sorted (evaluation)": stats(lengths, batch_rows(lengths, bs, False)),
            "random batches, padded to the longest": mean_stats([stats(lengths, random_batches(len(lengths), bs, s))
                                                                 for s in epochs]),
            f"fixed length {FIXED} (truncating)": stats(lengths, random_batches(len(lengths), bs, seeds[0]), FIXED),
        })
        ours = "ours, length-bucketed (training)" if split == "train" else "ours, sorted (evaluation)"
        print(f"{split}: {len(ds)} sentences, {sum(lengths):,} tokens, mean {statistics.mean(lengths):.1f}, median "
              f"{statistics.median(lengths):.0f}, max {max(lengths)}; batch size {bs}"
              + (f"; shuffled strategies: mean of {len(epochs)} epochs" if split == "train" else ""))
        print(table([header, *rows_for(strategies, ours)]) + "\n")


if __name__ == "__main__":
    main()
