"""One finetune flow for every method: an own-mechanism method (dp-kernel) killed mid-run
resumes under the events it recorded (no new event, same ε, the planned number of private
steps in all); every iterative trainer continues from a checkpoint exactly as it would have
gone on; single releases refuse --resume; EFSGD never swaps ghost silently; and every stage
that raises after its event is recorded ends `failed` with the event kept."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dpsynth.methods.mean_embedding.methods as me_methods
from dpsynth.cli.main import main
from dpsynth.methods import get_method
from dpsynth.pipeline.rundir import LOCK, MANIFEST, RunDir
from dpsynth.privacy.owner_key import load_owner_key
from dpsynth.progress import no_progress
from dpsynth.training.checkpoint import Checkpointing
from dpsynth.training.options import FinetuneOptions, resolve_options

FAULT = Path(__file__).with_name("fault_inject.py")
KERNEL = ["finetune", "--sensitive", "digits", "--limit", "300", "--public-size", "1797", "--resolution", "8", "--method", "dp-kernel",
          "--eps", "3", "--epochs", "1", "--batch-size", "60", "--train-opts", "features=16",
          "--arch", "width=4,hidden=16,latent_dim=8", "--checkpoint-every", "1", "--quiet", "--json"]


def _manifest(run: Path) -> dict:
    return yaml.safe_load((run / MANIFEST).read_text())


def test_dp_kernel_killed_mid_run_resumes_under_its_recorded_event(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    load_owner_key()  # created now if missing: its own fsync would shift the count below
    # fsyncs: 1 manifest (stage begins), 2 manifest (event), 3-5 checkpoint 1 (file, hash, pointer),
    # 6 inside checkpoint 2: killed there, step 1's checkpoint is the durable one.
    killed = subprocess.run([sys.executable, str(FAULT), "6", *KERNEL, "--run", str(run)], capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = RunDir.open(run)
    events = before.events()
    epsilon = before.manifest["privacy"]["epsilon"]
    entry = before.manifest["stages"]["finetune"]
    assert [(e.stage, e.mechanism) for e in events] == [("finetune", "poisson_gaussian")]
    assert entry["status"] == "running" and entry["checkpoint"]["step"] == 1
    (run / LOCK).unlink()

    releases = []
    original = me_methods.noisy_sum

    def counting(*args, **kwargs):
        releases.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(me_methods, "noisy_sum", counting)
    assert main([*KERNEL, "--resume", "--run", str(run)]) == 0, capsys.readouterr().err
    done = RunDir.open(run)
    assert done.stage_done("finetune") and done.events() == events  # the first attempt's events, no other
    assert done.manifest["privacy"]["epsilon"] == epsilon
    resumed = done.manifest["stages"]["finetune"]["resumed"]
    assert [r["from_step"] for r in resumed] == [1]
    assert 1 + len(releases) == events[0].steps  # the planned number of private steps in all
    assert "generator.pt" in done.manifest["artifacts"]
    assert not list(run.glob("checkpoint-*")) and not any(n.startswith("checkpoint-") for n in done.manifest["artifacts"])


@pytest.mark.parametrize("flag", [["--resume"], ["--checkpoint-every", "2"]])
def test_single_release_methods_refuse_resume_and_checkpoints_in_one_line(tmp_path, capsys, flag):
    run = tmp_path / "run"
    code = main(["finetune", "--run", str(run), "--method", "dp-merf", "--sensitive", "digits", "--limit", "300", "--public-size", "1797",
                 "--resolution", "8", "--eps", "1", *flag])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"drop {flag[0]}" in err, err
    assert not run.exists()


# ---- every iterative trainer continues from a checkpoint as the uninterrupted run goes on -------
TINY_GAN = "width=4,disc_width=4,latent_dim=4"
CASES = {
    "dp-gan": (60, FinetuneOptions(epochs=1, batch_size=10, train_opts="n_critic=2"), TINY_GAN, 3),
    "gs-wgan": (30, FinetuneOptions(batch_size=4, train_opts="discriminators=3,iterations=6,warmup_iters=2,"
                                                             "critic_iters=1"), TINY_GAN, 4),
    "dp-kernel": (40, FinetuneOptions(epochs=1, batch_size=10, train_opts="features=8"), "width=4,hidden=8", 2),
    "dp-cvae": (40, FinetuneOptions(epochs=2, batch_size=10), None, 5),
}


def _parse(arch):
    from dpsynth.methods import parse_arch

    return parse_arch(arch)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_iterative_trainer_resumes_exactly_where_it_stopped(name):
    n, given, arch, stop_at = CASES[name]
    method = get_method(name, _parse(arch))
    opts = resolve_options(method, given)
    plan = method.plan_private(dataset_size=n, opts=opts, spent=[], eps=8.0, delta=1e-4)
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % 3
    seen, captured = [], {}

    def on_step(step, snapshot):
        seen.append(step)
        if step == stop_at:
            captured["state"] = snapshot()

    def train(checkpoints):
        torch.manual_seed(0)
        model = method.build_generator(8, 1, 3)
        if checkpoints.resume is None:
            torch.manual_seed(1234)  # the stage reseeds from OS entropy; fixed here to compare
        return method.train_private(model, images, labels, opts=opts, plan=plan, device=torch.device("cpu"),
                                    progress=no_progress, checkpoints=checkpoints).generator

    full = train(Checkpointing(on_step=on_step))
    total = method.private_steps(plan)
    assert seen == list(range(1, total + 1)) and total == plan.events[-1].compositions
    seen.clear()
    resumed = train(Checkpointing(resume=captured["state"], on_step=on_step))
    assert seen == list(range(stop_at + 1, total + 1))  # the remaining steps, no more
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ---- options: EFSGD and ghost -------------------------------------------------------------------
def test_efsgd_refuses_an_asked_ghost_and_records_a_default_one():
    from dpsynth.errors import BadInput

    method = get_method("dp-cvae")
    with pytest.raises(BadInput, match=r"^grad_sample_mode=ghost cannot be used with private_optimizer=efsgd"):
        resolve_options(method, FinetuneOptions(private_optimizer="efsgd", grad_sample_mode="ghost"))
    opts = resolve_options(method, FinetuneOptions(private_optimizer="efsgd"))
    assert opts.grad_sample_mode == "vmap" and "default bk" in opts.notes[0]


def test_cli_names_the_flags_of_the_efsgd_ghost_refusal(tmp_path, capsys):
    code = main(["finetune", "--run", str(tmp_path / "run"), "--method", "dp-cvae", "--sensitive", "digits", "--eps",
                 "1", "--optimizer", "efsgd", "--grad-sample-mode", "ghost"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --grad-sample-mode ghost cannot be used with --optimizer efsgd"), err


# ---- every stage ends `failed` when it raises after its event is recorded -----------------------
class Boom(RuntimeError):
    pass


def _boom(*_args, **_kwargs):
    raise Boom("injected failure")


def _check_failed(run: Path, stage: str, events: list[str]) -> None:
    manifest = _manifest(run)
    assert manifest["stages"][stage]["status"] == "failed"
    assert [e["stage"] for e in manifest["privacy"]["events"]] == events  # the access happened: kept
    assert not (run / LOCK).exists()


FINETUNE_CVAE = ["finetune", "--sensitive", "digits", "--limit", "200", "--public-size", "1797", "--resolution", "8", "--method", "dp-cvae",
                 "--eps", "2", "--epochs", "1", "--batch-size", "200", "--quiet"]


def test_finetune_fails_after_its_event_and_keeps_it(tmp_path, monkeypatch):
    import dpsynth.training.dpsgd as dpsgd

    run = tmp_path / "run"
    monkeypatch.setattr(dpsgd, "train_dp", _boom)
    with pytest.raises(Boom):
        main([*FINETUNE_CVAE, "--run", str(run)])
    _check_failed(run, "finetune", ["finetune"])


def test_generate_fails_inside_its_body_and_is_never_left_running(tmp_path, monkeypatch):
    import dpsynth.pipeline.generate as generate

    run = tmp_path / "run"
    assert main([*FINETUNE_CVAE, "--run", str(run)]) == 0
    monkeypatch.setattr(generate, "save_image", _boom)  # inside the stage: the grid is written after the npz
    with pytest.raises(Boom):
        main(["generate", "--run", str(run), "--n", "30", "--quiet"])
    _check_failed(run, "generate", ["finetune"])


def test_select_public_fails_after_its_event_and_keeps_it(tmp_path, monkeypatch):
    import dpsynth.pipeline.select_public as select_public

    run = tmp_path / "run"
    monkeypatch.setattr(select_public, "add_gaussian_noise", _boom)
    with pytest.raises(Boom):
        main(["select-public", "--run", str(run), "--method", "privimage", "--sensitive", "fashionmnist",
              "--limit", "300", "--public-size", "60000", "--resolution", "8", "--public", "digits", "--sigma", "20", "--quiet"])
    _check_failed(run, "select-public", ["select-public"])


def test_dp_feta_pretrain_fails_after_its_central_images_event_and_keeps_it(tmp_path, monkeypatch):
    import dpsynth.pipeline.pretrain as pretrain

    run = tmp_path / "run"
    monkeypatch.setattr(pretrain, "train_nonprivate", _boom)  # after the central images are released
    with pytest.raises(Boom):
        main(["pretrain", "--run", str(run), "--method", "dp-feta", "--sensitive", "fashionmnist", "--limit", "300", "--public-size", "60000",
              "--resolution", "8", "--epochs", "1", "--batch-size", "64", "--arch", "width=4,ch_mult=1:2,num_res_blocks=1",
              "--central-batch", "100", "--quiet"])
    _check_failed(run, "pretrain", ["pretrain"])
