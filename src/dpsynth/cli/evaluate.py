"""`dpsynth evaluate`: accuracy under a named protocol and fidelity on a named feature network."""

from typing import Optional

import typer

from .common import DeviceOpt, JsonOpt, QuietOpt, RunOpt, emit, err, out, progress_bars


def command(
    protocol: str = typer.Option("dp-safe-selection", "--protocol",
                                 help="dp-safe-selection (default; synthetic validation split), noisy-val (noisy "
                                      "accuracy on the run's sensitive hold-out, charged to the ledger), "
                                      "test-set-selection (NOT DP; for comparison only) or dpimagebench-val "
                                      "(NOT DP: DPImageBench's own rule, un-noised accuracy on the hold-out; to "
                                      "compare with its tables use it with --classifier dpimagebench)."),
    classifier: str = typer.Option("cnn", "--classifier",
                                   help="cnn, resnet (ResNet-110), wrn (WRN-40-4), resnext (ResNeXt-29 8x4d), "
                                        "comma-separated, or dpimagebench (its three) / all."),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs of each classifier (checkpoints to select "
                                                    "from: one per epoch)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Classifier training batch size."),
    feature_public: Optional[str] = typer.Option(None, "--feature-public",
                                                 help="Public set for the domain feature network (default: the run's)."),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights",
                                                    help="Path of clean-fid's inception-2015-12-05.pt for Inception "
                                                         "metrics offline (default: use it if already cached)."),
    fid_max_real: int = typer.Option(10000, "--fid-max-real", help="Real training images used for FID/KID."),
    compare_protocols: bool = typer.Option(False, "--compare-protocols",
                                           help="Run every protocol on the same classifiers (those needing a "
                                                "hold-out only when the run has one) and print the test-set "
                                                "overstatement (NOT DP)."),
    val_eps: Optional[float] = typer.Option(None, "--val-eps",
                                            help="noisy-val: epsilon to charge now (must fit the run's target); "
                                                 "default: use the budget reserved at run creation."),
    val_noise: str = typer.Option("laplace", "--val-noise", help="noisy-val with --val-eps: laplace or gaussian."),
    sensitive_test: Optional[str] = typer.Option(None, "--sensitive-test",
                                                 help="Labelled test set for test accuracy (npz:PATH, "
                                                      "imagefolder:PATH or a name), same image shape and classes "
                                                      "as the training set. Default: the one recorded at run "
                                                      "creation, else the sensitive set's official test split; "
                                                      "npz:/imagefolder: runs have none and need this."),
    fidelity_only: bool = typer.Option(False, "--fidelity-only",
                                       help="Skip the classifiers: only FID/KID/IS/precision/recall (and FLD "
                                            "when a test set exists) against the sensitive training set."),
    device: str = DeviceOpt, run: str = RunOpt, quiet: bool = QuietOpt, json_out: bool = JsonOpt,
) -> None:
    """Train classifiers on the synthetic set, select checkpoints by the protocol, report real-test accuracy
    and FID, KID, IS, precision/recall and FLD against the sensitive training set."""
    from ..pipeline.evaluate import public_nearer_warning, run_evaluate
    from ..reporting import NOT_ACCOUNTED

    with progress_bars(quiet or json_out, "evaluate") as progress:
        result = run_evaluate(run, protocol=protocol, classifier=classifier, epochs=epochs,
                              feature_public=feature_public, compare_protocols=compare_protocols,
                              val_eps=val_eps, val_noise=val_noise, inception_weights=inception_weights,
                              fid_max_real=fid_max_real, batch_size=batch_size, sensitive_test=sensitive_test,
                              fidelity_only=fidelity_only, device=device, progress=progress)
    if json_out:
        result = {**result, "not_accounted": NOT_ACCOUNTED}
    emit(result, json_out, f"evaluate → {run}")
    if not json_out:
        out.print(NOT_ACCOUNTED, highlight=False, soft_wrap=True)
    warning = public_nearer_warning(result)
    if warning:  # on stderr, even with --json or --quiet: the samples may not be of the sensitive domain
        err.print(f"warning: {warning}", highlight=False, soft_wrap=True)
