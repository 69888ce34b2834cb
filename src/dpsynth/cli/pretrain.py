"""`dpsynth pretrain`: the generator's start: public data, or DP-FETA's / FETA-Pro's private warm-up."""

from typing import Optional

import typer

from ..key_values import parse_arch
from .common import (ArchOpt, DeltaOpt, DeviceOpt, JsonOpt, MethodOpt, QuietOpt, RunOpt, creates_runs, emit,
                     progress_bars)


@creates_runs()
def command(
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the public set. Default: the method's."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per (non-private) training step. Default: the method's."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate. Default: the method's."),
    central_sigma: float = typer.Option(5.0, "--central-sigma", help="DP-FETA: noise multiplier of each central-image "
                                                                     "query."),
    central_queries: int = typer.Option(5, "--central-queries", help="DP-FETA: number of queries (images per class)."),
    central_batch: int = typer.Option(6000, "--central-batch", help="DP-FETA: expected Poisson batch per query."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="DP-FETA: RandAugment during the warm-up."),
    freq_sigma: Optional[float] = typer.Option(None, "--freq-sigma", help="FETA-Pro: noise multiplier of the one "
                                                                          "random-Fourier-feature release (default 7.4); "
                                                                          "with aux kind=gmm, of its releases together."),
    warmup_order: Optional[str] = typer.Option(None, "--warmup-order", help="FETA-Pro: time_freq (central images, "
                                               "then auxiliary images; default), freq_time, mix (one joint set), "
                                               "time or freq (one release only)."),
    freq_epochs: Optional[int] = typer.Option(None, "--freq-epochs", help="FETA-Pro: warm-up epochs on the "
                                                                          "auxiliary images (default 10)."),
    freq_batch_size: Optional[int] = typer.Option(None, "--freq-batch-size", help="FETA-Pro: their batch size "
                                                                                  "(default 256)."),
    aux_opts: Optional[str] = typer.Option(None, "--aux-opts", help="FETA-Pro: the auxiliary generator and its "
                                           "release, k=v,... or JSON: kind=rff (default: features, bandwidth, "
                                           "count_weight, epochs, batch_size, lr, lr_decay, images, latent_dim, hidden, "
                                           "width) or kind=gmm (dp-gmm's mixture: components, rank, lloyd_iterations, "
                                           "clip, centred_clip, images)."),
    train_opts: Optional[str] = typer.Option(None, "--train-opts", help="Method-specific pretraining settings as "
                                             "JSON or k=v pairs (e.g. DP-LDM's ae_epochs=4); see `dpsynth methods`."),
    arch: Optional[str] = ArchOpt, device: str = DeviceOpt,
    run: str = RunOpt, method: Optional[str] = MethodOpt, delta: Optional[float] = DeltaOpt,
    quiet: bool = QuietOpt, json_out: bool = JsonOpt, settings=None,
) -> None:
    """Pretrain on the public subset chosen by select-public (or the whole public set), or warm up on DP-FETA's
    central images (a privacy event) and, for FETA-Pro, on an auxiliary generator's images (a second one)."""
    from ..pipeline.pretrain import run_pretrain

    with progress_bars(quiet or json_out, "pretrain") as progress:
        result = run_pretrain(run, settings, epochs=epochs, batch_size=batch_size, lr=lr, method=method,
                              delta=delta, arch=arch, device=device, central_sigma=central_sigma,
                              central_queries=central_queries, central_batch=central_batch, augment=augment,
                              warmup={"freq_sigma": freq_sigma, "warmup_order": warmup_order, "freq_epochs": freq_epochs,
                                      "freq_batch_size": freq_batch_size,
                                      "aux_opts": None if aux_opts is None else parse_arch(aux_opts, "`aux_opts`")},
                              train_opts=train_opts, progress=progress)
    emit(result, json_out, f"pretrain → {run}")
