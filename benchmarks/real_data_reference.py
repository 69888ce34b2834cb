"""What the evaluate stage's classifier reaches when it is trained on REAL images instead of synthetic ones:
the reference a synthetic set's accuracy is read against (NOT a private release: it reads the training set
directly, and nothing it prints may be released as DP).

    python benchmarks/real_data_reference.py [--dataset fashionmnist] [--sizes 10000,60000]
                                             [--classifier cnn] [--epochs 5] [--json]

Each size is a class-stratified random subset of the training split (`load_dataset(limit=...)`), put through
`evaluate_protocols` exactly as `dpsynth evaluate` puts a synthetic set through it (same classifier, epochs,
batch size, seed, DP-safe selection on a held-out 1/12 of the images given), and tested on the test split.
A synthetic set of n images is then read against the row of size n: the gap is what the generator loses,
the rest is the classifier's own limit at that size and training length.
"""

from __future__ import annotations

import argparse
import json
import time


def reference_rows(dataset: str, sizes: list[int], classifier: str, epochs: int, seed: int) -> list[dict]:
    from dpsynth.data.common import has_disjoint_test
    from dpsynth.data.registry import load_dataset
    from dpsynth.evaluation.selection import DP_SAFE
    from dpsynth.evaluation.utility import evaluate_protocols

    if not has_disjoint_test(dataset):  # its 'test' would be the training images: no reference at all
        raise ValueError(f"dataset {dataset!r} has no test split disjoint from its training split")
    test = load_dataset(dataset, "test")
    rows = []
    for size in sizes:
        train = load_dataset(dataset, "train", limit=size, seed=seed)
        start = time.perf_counter()
        result = evaluate_protocols(train.images, train.labels, lambda: (test.images, test.labels),
                                    train.num_classes, protocols=(DP_SAFE,), classifiers=(classifier,),
                                    epochs=epochs, seed=seed)
        outcome = result[DP_SAFE]
        rows.append({"dataset": dataset, "real_images": int(train.images.shape[0]), "classifier": classifier,
                     "epochs": epochs, "train_size": outcome.train_size,
                     "selected_epoch": outcome.selected_epochs[classifier],
                     "test_accuracy": round(100 * outcome.accuracies[classifier], 2),
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashionmnist")
    parser.add_argument("--sizes", default="10000,60000", help="comma-separated numbers of real training images")
    parser.add_argument("--classifier", default="cnn")
    parser.add_argument("--epochs", type=int, default=5, help="the evaluate stage's recipes use 5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        parser.error(f"--sizes {args.sizes!r}: expected comma-separated positive integers")
    try:
        rows = reference_rows(args.dataset, sizes, args.classifier, args.epochs, args.seed)
    except ValueError as exc:
        parser.error(f"--dataset: {exc}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    import pandas as pd

    print("real-image reference (NOT DP: trained on the sensitive training set itself)")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
