"""How many OTHER images change membership when one image is added to the sensitive set.

Compares the per-class seeded shuffles that `--limit` and `--holdout` used before issue 11
(data.registry.choose_subset, evaluation.splits.stratified_split: still used for public
data and synthetic splits) with the keyed per-record coins they use now (data.keyed).

    python benchmarks/membership_stability.py [--dataset fashionmnist] [--limit 2000] [--holdout 0.1]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

os.environ.setdefault("DPSYNTH_HOME", tempfile.mkdtemp())  # a throwaway owner key

from dpsynth.data import ImageSet, load_dataset  # noqa: E402
from dpsynth.data.keyed import keyed_members  # noqa: E402
from dpsynth.data.registry import choose_subset  # noqa: E402
from dpsynth.evaluation.splits import stratified_split  # noqa: E402
from dpsynth.privacy.owner_key import load_owner_key  # noqa: E402


def mask(indices: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.bool)
    out[indices] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashionmnist")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--holdout", type=float, default=0.1)
    args = parser.parse_args()
    base = load_dataset(args.dataset, "train")
    n, at = len(base), len(base) // 2
    extra = torch.full((1, *base.images.shape[1:]), 7, dtype=torch.uint8)
    grown = ImageSet(torch.cat([base.images[:at], extra, base.images[at:]]),
                     torch.cat([base.labels[:at], torch.tensor([3]), base.labels[at:]]),
                     base.num_classes, base.name, base.split, base.source)

    def common(m: torch.Tensor) -> torch.Tensor:  # the grown set's decisions on the original images
        return torch.cat([m[:at], m[at + 1:]])

    key = load_owner_key()
    rows = []
    old_limit = (mask(choose_subset(base.labels, n, args.limit, 0), n),
                 common(mask(choose_subset(grown.labels, n + 1, args.limit, 0), n + 1)))
    new_limit = (keyed_members(base, key, args.limit / n, "limit", 0),
                 common(keyed_members(grown, key, args.limit / n, "limit", 0)))
    old_hold = (mask(stratified_split(base.labels, args.holdout, 0)[1], n),
                common(mask(stratified_split(grown.labels, args.holdout, 0)[1], n + 1)))
    new_hold = (keyed_members(base, key, args.holdout, "holdout", 0),
                common(keyed_members(grown, key, args.holdout, "holdout", 0)))
    for what, (a, b) in ((f"--limit {args.limit}, per-class shuffle (before)", old_limit),
                         (f"--limit {args.limit}, keyed coins (now)", new_limit),
                         (f"--holdout {args.holdout:g}, per-class shuffle (before)", old_hold),
                         (f"--holdout {args.holdout:g}, keyed coins (now)", new_hold)):
        rows.append((what, int(a.sum()), int((a ^ b).sum())))
    print(f"{args.dataset}: N = {n}, one image added")
    print(f"{'selection':48s} {'members':>8s} {'others moved':>13s}")
    for what, members, moved in rows:
        print(f"{what:48s} {members:8d} {moved:13d}")


if __name__ == "__main__":
    main()
