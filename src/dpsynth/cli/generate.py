"""`dpsynth generate`: labelled synthetic images (npz) and a PNG grid."""

from typing import Optional

import typer

from .common import DeviceOpt, JsonOpt, QuietOpt, RunOpt, emit, progress_bars


def command(n: int = typer.Option(10000, "--n", help="Number of images (class-balanced)."),
            seed: int = typer.Option(0, "--seed", help="Seed of the sampler's latent noise (sampling is post-processing "
                                                          "of the DP generator: a known seed costs no privacy)."),
            steps: Optional[int] = typer.Option(None, "--steps", help="Diffusion sampler steps (Heun). "
                                                                       "Default: the method's."),
            guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale "
                                                                               "(needs a model trained with label "
                                                                               "dropout). Default 0."),
            batch_size: int = typer.Option(1000, "--batch-size", help="Images per sampler batch."),
            ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights when the run has them."),
            device: str = DeviceOpt, run: str = RunOpt, quiet: bool = QuietOpt, json_out: bool = JsonOpt) -> None:
    """Sample the fine-tuned generator (post-processing: no privacy cost)."""
    from ..pipeline.generate import run_generate

    with progress_bars(quiet or json_out, "generate") as progress:
        result = run_generate(run, n=n, seed=seed, batch_size=batch_size, steps=steps, guidance=guidance,
                              device=device, use_ema=ema, progress=progress)
    emit(result, json_out, f"generate → {run}")
