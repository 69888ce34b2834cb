"""benchmarks/leaderboard.py on two tiny mean-embedding recipes: the row format (ledger epsilon, accuracy
with its protocol and classifiers, FID with its network's kind, time and memory, the published row), one
evaluation protocol imposed on every row, and resuming (stored rows are skipped, --fresh reruns them)."""

import json
import sys
from pathlib import Path

import yaml
from benchmark_helpers import load_benchmark


def tiny_recipe(folder: Path, method: str, train_opts: dict) -> None:
    data = {"sensitive": "fashionmnist", "resolution": 8, "limit": 600, "public-size": 600}
    recipe = {"select-public": {"method": method, **data}, "pretrain": {"method": method, **data},
              "finetune": {"method": method, **data, "eps": 10, "epochs": 1, "batch-size": 100,
                           "train-opts": train_opts, "arch": {"width": 4, "hidden": 32}},
              "generate": {"n": 200},
              "evaluate": {"protocol": "test-set-selection", "classifier": "cnn", "epochs": 3}}  # overridden
    (folder / method).mkdir(parents=True)
    (folder / method / "fashionmnist-small.yaml").write_text(yaml.safe_dump(recipe))


def test_rows_resume_and_one_protocol(tmp_path, capsys):
    board = load_benchmark("leaderboard")
    recipes, runs = tmp_path / "recipes", tmp_path / "runs"
    tiny_recipe(recipes, "dp-merf", {"features": 200})
    tiny_recipe(recipes, "dp-ntk", {})
    common = ["--eps", "10", "--eval-epochs", "1", "--recipes", str(recipes), "--runs", str(runs),
              "--dpsynth", f"{sys.executable} -m dpsynth", "--out", str(tmp_path / "board.md")]
    first = board.main(["--methods", "dp-merf,dp-gan", *common])  # a first part of the board
    stored = json.loads((runs / "rows.json").read_text())
    capsys.readouterr()
    with (tmp_path / "board.md").open("a") as notes:  # hand-written notes below the table survive a rebuild
        notes.write(f"\n{board.NOTES_MARKER}\nrows measured by other means\n")
    # The second part: the stored dp-merf row is skipped, dp-ntk runs; --fresh would rerun them all.
    frame = board.main(["--methods", "dp-merf,dp-ntk,dp-gan", *common])
    err = capsys.readouterr().err
    assert "dp-merf eps=10: stored, skipped" in err and "dp-ntk eps=10: stored" not in err
    rows = {r["method"]: r for r in json.loads((runs / "rows.json").read_text())}
    assert rows["dp-merf"] == {r["method"]: r for r in stored}["dp-merf"] and len(first) == 2
    assert rows["dp-gan"]["status"] == "no recipe" and "wall_s" not in rows["dp-gan"]
    for method in ("dp-merf", "dp-ntk"):
        row = rows[method]
        assert row["status"] == "ok", row
        manifest = yaml.safe_load((runs / f"{method}-small-eps10-dp-safe-selection" / "manifest.yaml").read_text())
        assert row["eps_spent"] == round(manifest["privacy"]["epsilon"], 3) and row["eps_spent"] <= 10
        assert set(manifest["results"]) == {"dp-safe-selection"}  # the recipe's own protocol was overridden
        assert row["protocol"] == "dp-safe-selection" and row["classifiers"] == "cnn" and row["dp_safe"] is True
        assert 0 <= row["accuracy"] <= 100 and row["fid_kind"] == "domain (not Inception)" and row["fid_network"]
        assert row["wall_s"] > 0 and row["peak_mb"] > 50 and row["within_budget"] is True
        assert row["published_acc"] == board.PUBLISHED_ACCURACY[method][1]
    assert list(frame.columns) == list(board.COLUMNS) and len(frame) == 3
    board_md = (tmp_path / "board.md").read_text()
    assert "| dp-merf | small | 10 |" in board_md and "| dp-ntk | small | 10 |" in board_md and "not DP" in board_md
    assert board_md.count(board.NOTES_MARKER) == 1 and board_md.endswith("rows measured by other means\n")
    # The header's command reproduces the table elsewhere: this machine's --runs and --dpsynth are left out.
    assert "--methods dp-merf,dp-ntk,dp-gan --eps 10" in board_md and str(runs) not in board_md
    assert "--dpsynth" not in board_md and sys.executable not in board_md
