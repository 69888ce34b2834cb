"""`dpsynth report` on real run directories written through RunDir (no training: the stages
that produce results are tested elsewhere; here only their recorded outputs matter)."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import dpsynth
from dpsynth.privacy.accountant import compose_epsilon
from dpsynth.privacy.events import GaussianEvent
from dpsynth.reporting import (CLASS_COUNTS_PNG, NOT_ACCOUNTED, NOT_EVALUATED, PRIVACY_UTILITY_PNG, collect_results,
                               comparable_groups, fid_axis_label, format_table, privacy_utility_figure,
                               report_figures, run_colours, run_labels, write_report)
from dpsynth.pipeline.rundir import RunDir

FEATURES = "querynet(mnist5k,8px,1ch):sha256:0123456789ab"


def make_run(path, sigma, results=None, num_classes=3, n=30, delta=1e-5, synthetic=True):
    """A finished run: one Gaussian release in the ledger, synthetic.npz, samples.png, results."""
    run = RunDir.create(path, method="privimage-cvae",
                        sensitive={"name": "tiny", "size": 100, "num_classes": num_classes, "resolution": 8,
                                   "channels": 1, "fingerprint": "sha256:0"},
                        public=None, delta=delta, settings={"sensitive": "tiny", "public": None, "seed": 0})
    rng = np.random.default_rng(int(sigma * 10))
    images = rng.integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % num_classes

    def npz(buffer):
        np.savez_compressed(buffer, images=images, labels=labels)

    def grid(buffer):
        Image.fromarray(np.concatenate(list(images[:4, 0]), axis=1)).save(buffer, format="png")

    with run.lock():
        event = GaussianEvent("select-public", float(sigma))
        run.record_event(event, compose_epsilon([event], run.delta))
        if synthetic:
            run.begin_stage("generate", {"n": n}, inputs=[])
            run.write_artifact("generate", "synthetic.npz", npz)
            run.write_artifact("generate", "samples.png", grid)
            run.end_stage("generate")
        epsilon = run.manifest["privacy"]["epsilon"]
        for protocol in results or []:
            run.manifest["results"][protocol] = {
                "protocol": protocol, "dp_safe": protocol == "dp-safe-selection", "classifier": "cnn",
                "accuracy": 0.5 + 0.01 * sigma, "selected_epoch": {"cnn": 2}, "epochs": 10,
                "per_classifier": {"cnn": {"accuracy": 0.5 + 0.01 * sigma, "selected_epoch": 2}},
                "fid_domain": 40.0 / sigma,
                "kid_domain": 0.01, "feature_network": FEATURES, "precision_domain": 0.6, "recall_domain": 0.4,
                "fld_domain": 12.0, "n_synthetic": n, "epsilon": epsilon, "delta": run.delta}
        run.save()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return [str(make_run(root / "run-a", 1.0, ["dp-safe-selection"])),
            str(make_run(root / "run-b", 4.0, ["dp-safe-selection"]))]


def manifest_epsilon(path):
    return RunDir.open(path).manifest["privacy"]["epsilon"]


def test_collect_results_one_row_per_run_with_ledger_epsilon(runs):
    table = collect_results(runs)
    assert len(table) == 2
    assert table["run"].tolist() == runs
    assert table["epsilon"].tolist() == [manifest_epsilon(r) for r in runs]
    assert table["epsilon"].iloc[0] > table["epsilon"].iloc[1] > 0  # less noise, more epsilon
    assert table["protocol"].tolist() == ["dp-safe-selection"] * 2
    assert table["feature_network"].tolist() == [FEATURES] * 2


def test_unevaluated_run_has_a_row_of_nans_and_bad_run_raises(runs, tmp_path):
    fresh = str(make_run(tmp_path / "fresh", 2.0))
    row = collect_results([fresh]).iloc[0]
    assert row["protocol"] == NOT_EVALUATED
    assert np.isnan(row["accuracy"]) and np.isnan(row["fid_domain"])
    assert row["epsilon"] == manifest_epsilon(fresh)
    from dpsynth.errors import RunDirError
    with pytest.raises(RunDirError, match="no manifest.yaml"):
        collect_results([runs[0], str(tmp_path / "nowhere")])


def test_fid_label_names_the_feature_network(runs):
    fig = privacy_utility_figure(collect_results(runs))
    assert fig.axes[1].get_ylabel() == f"FID on {FEATURES}"
    assert fid_axis_label([FEATURES, "other-net:sha256:ff"]) == "FID (domain features; see table)"
    assert fid_axis_label([float("nan")]) != "FID"


def test_cli_json_writes_the_three_kinds_of_png(runs, tmp_path):
    out = tmp_path / "out"
    proc = dpsynth("report", *runs, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert [row["epsilon"] for row in payload["rows"]] == [manifest_epsilon(r) for r in runs]
    expected = {PRIVACY_UTILITY_PNG, CLASS_COUNTS_PNG, "samples_run-a.png", "samples_run-b.png"}  # by directory
    assert {p.rsplit("/", 1)[-1] for p in payload["plots"]} == expected
    assert {p.name for p in out.iterdir()} == expected  # and no temp files left
    for name in expected:
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            image.verify()
    assert (out / "samples_run-a.png").read_bytes() == (Path(runs[0]) / "samples.png").read_bytes()


def test_tampered_samples_are_refused_and_nothing_is_written(runs, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(runs[0], copy)
    with Image.open(copy / "samples.png") as image:
        pixels = np.array(image)
    pixels[0, 0] ^= 0xFF
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png")
    (copy / "samples.png").write_bytes(buffer.getvalue())
    out = tmp_path / "out"
    proc = dpsynth("report", runs[1], str(copy), "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "samples.png" in lines[0], proc.stderr
    assert not out.exists()


def test_bad_format_exits_2(runs, tmp_path):
    proc = dpsynth("report", runs[0], "--out", str(tmp_path / "out"), "--format", "xlsx")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --format 'xlsx' is unknown; choose one of markdown, csv"]
    assert not (tmp_path / "out").exists()


def test_test_set_selection_is_marked_not_dp(tmp_path, capsys):
    path = str(make_run(tmp_path / "both", 2.0, ["dp-safe-selection", "test-set-selection"]))
    report = write_report([path], tmp_path / "out")
    markdown = format_table(report.table, "markdown")
    rows = [line for line in markdown.splitlines() if "selection" in line]
    assert len(rows) == 2
    assert "| dp-safe-selection |" in rows[0] and "NOT DP" not in rows[0]
    assert "| test-set-selection (NOT DP) |" in rows[1]
    assert report.table["dp_safe"].tolist() == [True, False]  # csv/json keep the raw flag

    from dpsynth.cli.main import main
    assert main(["report", path, "--out", str(tmp_path / "out2")]) == 0
    assert "test-set-selection (NOT DP)" in capsys.readouterr().out


def test_artifact_names_match_the_generate_stage():
    from dpsynth import reporting
    from dpsynth.pipeline import generate
    assert (reporting.SYNTHETIC, reporting.GRID) == (generate.SYNTHETIC, generate.GRID)


def test_privacy_utility_curve_joins_dp_safe_runs_in_order_of_epsilon(runs):
    table = collect_results(runs)
    fig = privacy_utility_figure(table)
    ax_acc, ax_fid = fig.axes[:2]
    curves = [line for line in ax_acc.get_lines() if "dp-safe-selection" in line.get_label()]
    assert len(curves) == 1
    order = np.argsort(table["epsilon"].to_numpy())
    assert list(curves[0].get_xdata()) == list(table["epsilon"].to_numpy()[order])
    assert list(curves[0].get_ydata()) == pytest.approx(list(100 * table["accuracy"].to_numpy()[order]))  # percent
    assert ax_acc.get_ylabel().endswith("(%)")
    fid_curve = [line for line in ax_fid.get_lines() if "dp-safe-selection" in line.get_label()][0]
    assert list(fid_curve.get_ydata()) == list(table["fid_domain"].to_numpy()[order])


def test_markdown_names_best_and_mean_and_keeps_noisy_val_dp(tmp_path):
    path = make_run(tmp_path / "three", 2.0, ["dp-safe-selection", "noisy-val", "test-set-selection"])
    run = RunDir.open(path)
    for name, row in run.manifest["results"].items():
        row.update(dp_safe=name != "test-set-selection", accuracy_mean=0.25, best_classifier="cnn", is_domain=3.5)
    with run.lock():
        run.save()
    markdown = format_table(collect_results([str(path)]), "markdown")
    header = markdown.splitlines()[0]
    assert "| accuracy (%) | accuracy_best (%) |" in header and "is_domain" in header
    assert "fid_inception" not in header  # no run has Inception features: no such column
    rows = {line.split(" | ")[6]: line for line in markdown.splitlines()[2:]}
    assert set(rows) == {"dp-safe-selection", "noisy-val", "test-set-selection (NOT DP)"}
    assert "| 25.00 |" in rows["noisy-val"] and "| 3.5 |" in rows["noisy-val"]


def test_per_classifier_accuracies_become_columns(tmp_path):
    path = make_run(tmp_path / "multi", 2.0, ["dp-safe-selection"])
    run = RunDir.open(path)
    run.manifest["results"]["dp-safe-selection"].update(
        classifier="cnn,wrn", accuracy=0.8, accuracy_mean=0.7,
        per_classifier={"cnn": {"accuracy": 0.6, "selected_epoch": 2}, "wrn": {"accuracy": 0.8, "selected_epoch": 3}})
    with run.lock():
        run.save()
    table = collect_results([str(path)])
    assert table[["accuracy_cnn", "accuracy_wrn"]].iloc[0].tolist() == [0.6, 0.8]
    # A manifest from before the headline became the mean (no accuracy_best): read as the mean, best kept.
    assert table["accuracy"].iloc[0] == pytest.approx(0.7) and table["accuracy_best"].iloc[0] == 0.8
    header = format_table(table, "markdown").splitlines()[0]
    assert "| accuracy (%) | accuracy_best (%) | accuracy_cnn (%) | accuracy_wrn (%) |" in header


def test_the_line_on_what_the_ledger_omits_is_under_every_table(runs, tmp_path, capsys):
    from dpsynth.cli.main import main
    assert main(["report", *runs, "--out", str(tmp_path / "md")]) == 0
    printed = capsys.readouterr()
    table, _, note = printed.out.rstrip("\n").rpartition("\n\n")
    assert table.startswith("| run |") and note == NOT_ACCOUNTED
    assert "not accounted" in NOT_ACCOUNTED and "not release" in NOT_ACCOUNTED
    # CSV keeps stdout a clean table: the line goes to stderr; JSON carries it as a key.
    assert main(["report", *runs, "--out", str(tmp_path / "csv"), "--format", "csv"]) == 0
    printed = capsys.readouterr()
    assert NOT_ACCOUNTED not in printed.out and NOT_ACCOUNTED in printed.err.replace("\n", " ")
    assert main(["report", *runs, "--out", str(tmp_path / "json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["not_accounted"] == NOT_ACCOUNTED


# ---- readable reports: runs named by directory, one colour per run, comparable lines, units --------
def _legend_texts(fig):
    return [text.get_text() for legend in fig.legends for text in legend.get_texts()]


def test_runs_are_named_by_their_directory_in_the_table_and_both_legends(runs):
    table = collect_results(runs)
    markdown = format_table(table, "markdown")
    body = markdown.splitlines()[2:]
    run_ids = [RunDir.open(r).manifest["run_id"] for r in runs]
    for path, line in zip(runs, body):
        assert line.startswith(f"| {path} | privimage-cvae | tiny | 100 |")
    assert not any(rid in markdown for rid in run_ids)  # the opaque id stays in csv/json only
    labels = run_labels(table)
    assert labels[runs[0]] == f"{runs[0]} (privimage-cvae, ε={manifest_epsilon(runs[0]):.3g})"
    counts = {r: np.array([10, 10, 10]) for r in runs}
    figures = report_figures(table, counts)
    for name in (PRIVACY_UTILITY_PNG, CLASS_COUNTS_PNG):
        assert {labels[r] for r in runs} <= set(_legend_texts(figures[name])), name


def test_units_are_in_the_header_accuracy_percent_kid_scale_epochs_one_based(runs, tmp_path):
    markdown = format_table(collect_results(runs), "markdown")
    header, _, first = markdown.splitlines()[:3]
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(columns, (c.strip() for c in first.strip("|").split("|"))))
    assert cells["accuracy (%)"] == "51.00"  # 0.51 in the manifest
    assert cells["kid_domain (raw)"] == "0.01"  # a domain network's KID has its own scale: shown raw
    assert cells["selected epoch (1 = first, of E)"] == "2/10"
    raw = collect_results(runs)  # csv keeps the raw values, as results.csv does
    assert raw["accuracy"].iloc[0] == pytest.approx(0.51) and raw["kid_domain"].iloc[0] == 0.01
    path = make_run(tmp_path / "inception", 2.0, ["dp-safe-selection"])
    run = RunDir.open(path)
    run.manifest["results"]["dp-safe-selection"].update(kid_inception=0.0042, fid_inception=30.0)
    with run.lock():
        run.save()
    lines = format_table(collect_results([str(path)]), "markdown").splitlines()
    cells = dict(zip((c.strip() for c in lines[0].strip("|").split("|")), (c.strip() for c in lines[2].strip("|").split("|"))))
    assert cells["kid_inception (x10^3)"] == "4.2"  # Inception KID at the published tables' scale


def test_one_colour_per_run_in_both_plots_even_when_a_run_has_no_synthetic_set(tmp_path):
    # The first run has results but no synthetic set: the class-count plot shows only the second,
    # which must keep the colour it has in the privacy-utility plot.
    first = str(make_run(tmp_path / "no-samples", 1.0, ["dp-safe-selection"], synthetic=False))
    second = str(make_run(tmp_path / "with-samples", 4.0, ["dp-safe-selection"]))
    colours = run_colours([first, second])
    assert colours[first] != colours[second] and list(colours) == [first, second]
    assert run_colours([first, second]) == colours  # the same runs always get the same colours
    table = collect_results([first, second])
    figures = report_figures(table, {second: np.array([10, 10, 10])})
    label = run_labels(table)[second]
    points = [c for ax in figures[PRIVACY_UTILITY_PNG].axes for c in ax.collections if c.get_label() == label]
    bars = [p for p in figures[CLASS_COUNTS_PNG].axes[0].patches]
    assert points and bars
    assert all(tuple(p.get_facecolor()[0]) == pytest.approx(colours[second]) for p in points)
    assert all(tuple(b.get_facecolor()) == pytest.approx(colours[second]) for b in bars)


def test_runs_with_different_delta_are_not_joined(tmp_path):
    paths = [str(make_run(tmp_path / f"d{i}", sigma, ["dp-safe-selection"], delta=delta))
             for i, (sigma, delta) in enumerate([(1.0, 1e-5), (4.0, 1e-6), (2.0, 1e-5)])]
    table = collect_results(paths)
    groups = comparable_groups(table)
    assert [sorted(g["run"]) for g in groups] == [sorted([paths[0], paths[2]])]  # the 1e-6 run stands alone
    ax_acc = privacy_utility_figure(table).axes[0]
    lines = [line for line in ax_acc.get_lines() if line.get_label().startswith("line:")]
    assert len(lines) == 1 and "δ=1e-05" in lines[0].get_label()
    assert sorted(lines[0].get_xdata()) == sorted(table.loc[table["delta"] == 1e-5, "epsilon"])
    assert comparable_groups(collect_results([paths[0], paths[1]])) == []
