"""Bad input: one line naming the value, exit 2, no traceback, nothing on disk changed."""

import pytest

from cli_helpers import dpsynth, snapshot

CASES = [
    (["select-public", "--sensitive", "nosuchset", "--sigma", "1"], "unknown dataset 'nosuchset'"),
    (["select-public", "--sensitive", "fashionmnist", "--sigma", "0"], "--sigma 0.0"),
    (["select-public", "--sensitive", "fashionmnist", "--sigma", "-2"], "--sigma -2.0"),
    (["select-public", "--sensitive", "fashionmnist"], "exactly one of --sigma"),
    (["select-public", "--sensitive", "celeba", "--sigma", "1.2"], "celeba"),
    (["select-public", "--sensitive", "fashionmnist", "--sigma", "1", "--top-k", "0"], "--top-k 0"),
    (["select-public", "--sensitive", "fashionmnist", "--sigma", "1", "--delta", "1.5"], "delta=1.5"),
    (["select-public", "--sensitive", "npz:/nonexistent/x.npz", "--sigma", "1"], "/nonexistent/x.npz"),
    (["finetune", "--eps", "0"], "--eps 0.0"),
    (["finetune", "--eps", "-1"], "--eps -1.0"),
    (["finetune", "--eps", "nan"], "--eps nan"),
    (["finetune", "--eps", "1"], "does not exist"),
    (["pretrain"], "does not exist"),
    (["generate", "--n", "10"], "has no manifest.yaml"),
    (["generate", "--n", "0"], "--n 0"),
    (["evaluate", "--protocol", "best-of-test"], "--protocol 'best-of-test'"),
    (["ledger"], "has no manifest.yaml"),
    (["finetune", "--eps", "1", "--sensitive", "fashionmnist", "--method", "nosuch"], "unknown method 'nosuch'"),
    (["finetune", "--eps", "1", "--grad-sample-mode", "magic"], "--grad-sample-mode 'magic'"),
    (["finetune", "--eps", "1", "--secure"], "torchcsprng"),
    (["finetune", "--eps", "abc"], "Invalid value for '--eps'"),
]


@pytest.mark.parametrize("args,expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, args, expected):
    run = tmp_path / "run"
    before = snapshot(tmp_path)
    result = dpsynth(*args, "--run", str(run), env={"DPSYNTH_DATA": str(tmp_path / "empty-root")}
                     if "celeba" in args else None)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr, result.stderr
    assert snapshot(tmp_path) == before
    assert not run.exists()


def test_missing_celeba_says_where_the_files_go(tmp_path):
    result = dpsynth("select-public", "--sensitive", "celeba", "--sigma", "1.2", "--run", str(tmp_path / "r"),
                     env={"DPSYNTH_DATA": str(tmp_path / "root")})
    assert result.returncode == 2
    assert str(tmp_path / "root" / "celeba") in result.stderr
