"""benchmarks/real_data_reference.py: the evaluate stage's classifier on real training images, tested on the
real test split; a dataset whose test split is its training split is refused."""

import pytest
from benchmark_helpers import load_benchmark


def test_a_row_per_size_with_the_selection_split_held_out():
    (row,) = load_benchmark("real_data_reference").reference_rows("fashionmnist", [600], "cnn", epochs=1, seed=0)
    assert row["real_images"] == 600
    assert row["train_size"] == 550  # 1/12 held out for DP-safe selection, as evaluate does
    assert row["selected_epoch"] == 1
    assert 20.0 < row["test_accuracy"] <= 100.0  # well above chance (10%) after one epoch on real images


def test_a_dataset_without_a_disjoint_test_split_is_refused():
    with pytest.raises(ValueError, match="digits"):
        load_benchmark("real_data_reference").reference_rows("digits", [100], "cnn", epochs=1, seed=0)
