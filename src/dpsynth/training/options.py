"""The one options object of private training, from the CLI to the loop (torch-free).

`dpsynth finetune` builds a `FinetuneOptions` from its flags (None: not given), the stage
resolves it ONCE against the method's defaults (`resolve_options`), and that resolved object
is what the method's plan, its trainer and the DP-SGD loop read. Given the declared N, the
defaults the user did not set are adapted to a small sensitive set first (`adapt_to_size`).
Names:
- `private_optimizer`: the private mechanism's optimizer, dpsgd or efsgd (flag --optimizer);
- `base_optimizer`: the update rule it feeds, adam or sgd (a loop setting, no flag).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import BadInput
from ..privacy.plans import CLIPPED_SUM_MODES, PRIVATE_OPTIMIZERS
from ..validation import check_choice, check_fraction, check_positive

BASE_OPTIMIZERS = ("adam", "sgd")
GRAD_SAMPLE_MODES = ("bk", "ghost", "vmap", "hooks", "functorch")
PRECISIONS = ("fp32", "bf16")
# The options a user can set; a method accepts those that are keys of its `method_defaults`.
OPTIONS = ("epochs", "batch_size", "clip", "lr", "grad_sample_mode", "noise_multiplicity", "physical_batch_size",
           "ema", "private_optimizer", "feedback_clip", "precision", "train_opts")
# Settings of the DP-SGD loop (`training.dpsgd.train_dp`) itself: every DP-SGD method has them.
DPSGD_DEFAULTS = {"precision": "fp32"}

# Defaults adapted to N (issue 16; docs/DECISIONS.md "Defaults adapted to N"). The methods'
# finetune defaults are sized for REFERENCE_SIZE images (MNIST / Fashion-MNIST train). On a smaller
# declared N they would take a handful of steps at a high sample rate (diffusion: batch 4096 on
# N = 5,000 is q = 1, 2 steps; on N = 1,797 it is refused) and barely move a public-pretrained
# generator. Only values the user did not set (flag or recipe) change:
# - batch_size <= max(MIN_BATCH, floor(MAX_SAMPLE_RATE * N)) (never raised): amplification by
#   subsampling only pays at a small q; 32 keeps a step's noise σC/B from swamping its signal;
# - epochs raised (never lowered) to the nearest whole number giving ~min(T_budget, max(T_ref,
#   MIN_STEPS)) steps: T_ref is the default's step count at REFERENCE_SIZE (what its lr was tuned
#   for), raised towards MIN_STEPS when the batch was made smaller, but never past T_budget, the
#   steps the default's compute at REFERENCE_SIZE (epochs x 60,000 examples) buys at this batch;
# - lr unchanged: Adam moves each weight by about lr per step whatever the gradient's scale, so
#   keeping the step count keeps how far the fine-tune can move from the pretrained weights.
# At N >= REFERENCE_SIZE nothing changes; at the reference size T_budget = T_ref, so the rule is
# continuous there. Rounding the epochs to the nearest (not up) keeps a few percent fewer images
# (a hold-out) from adding a whole epoch.
REFERENCE_SIZE = 60_000
MAX_SAMPLE_RATE = 0.1
MIN_BATCH = 32
MIN_STEPS = 200


@dataclass(frozen=True)
class FinetuneOptions:
    """Given (None: not given) or resolved (the method's defaults filled in; an option the
    method does not have stays None). `notes` records choices made for the user."""

    epochs: int | None = None
    batch_size: int | None = None
    clip: float | None = None
    lr: float | None = None
    grad_sample_mode: str | None = None
    noise_multiplicity: int | None = None
    physical_batch_size: int | None = None
    ema: float | None = None
    private_optimizer: str | None = None
    feedback_clip: float | None = None
    precision: str | None = None  # fp32, or bf16: the forward under bf16 autocast, clipping and noise in fp32
    train_opts: Any = None  # dict, or "k=v,..." / JSON text until resolved
    secure: bool = False
    base_optimizer: str = "adam"
    notes: tuple = field(default=(), compare=False)
    # ((option, method default, value used), ...): defaults adapted to the declared N (adapt_to_size)
    adapted: tuple = field(default=(), compare=False)

    def __getitem__(self, key: str) -> Any:  # read access for method code written against dicts
        return getattr(self, key)

    def given(self) -> dict:
        """{option: value} of the user-settable options that were given."""
        return {k: getattr(self, k) for k in OPTIONS if getattr(self, k) not in (None, {})}

    def record(self) -> dict:
        """The resolved options as the stage's config records them (enough to rebuild them)."""
        out = {k: v for k, v in asdict(self).items() if k in OPTIONS and v is not None}
        out["secure"] = self.secure
        return out

    @classmethod
    def from_record(cls, config: dict) -> "FinetuneOptions":
        return cls(**{k: config[k] for k in (*OPTIONS, "secure") if config.get(k) is not None})

    def replace(self, **changes) -> "FinetuneOptions":
        return replace(self, **changes)


def check_values(opts: FinetuneOptions) -> None:
    """Each given value on its own (None: not given); no data is read."""
    for name in ("epochs", "batch_size", "noise_multiplicity", "physical_batch_size"):
        if getattr(opts, name) is not None:
            check_positive(name, getattr(opts, name), integer=True)
    for name in ("clip", "lr", "feedback_clip"):
        if getattr(opts, name) is not None:
            check_positive(name, getattr(opts, name))
    if opts.private_optimizer is not None:
        check_choice("private_optimizer", opts.private_optimizer, PRIVATE_OPTIMIZERS)
    check_choice("base_optimizer", opts.base_optimizer, BASE_OPTIMIZERS)
    if opts.ema is not None:
        check_fraction("ema", opts.ema)
    if opts.grad_sample_mode is not None:
        check_choice("grad_sample_mode", opts.grad_sample_mode, GRAD_SAMPLE_MODES)
    if opts.precision is not None:
        check_choice("precision", opts.precision, PRECISIONS)


def check_combination(opts: FinetuneOptions) -> None:
    """Settings that cannot go together (after resolution)."""
    if opts.grad_sample_mode == "ghost" and (opts.noise_multiplicity or 1) > 1:
        raise BadInput(f"grad_sample_mode=ghost clips each row, so it cannot average noise_multiplicity="
                       f"{opts.noise_multiplicity} draws per example; use vmap, hooks or functorch")
    if opts.private_optimizer == "efsgd" and opts.grad_sample_mode in CLIPPED_SUM_MODES:
        raise BadInput(f"grad_sample_mode={opts.grad_sample_mode} cannot be used with private_optimizer=efsgd (its "
                       f"error feedback needs each example's gradient); use vmap, hooks or functorch")
    if opts.precision == "bf16" and opts.grad_sample_mode == "ghost":
        raise BadInput("grad_sample_mode=ghost cannot be used with precision=bf16 (its clipped sum comes from a "
                       "second backward through the bf16 forward, not in fp32); use bk, vmap, hooks or functorch")
    if opts.private_optimizer != "efsgd" and opts.feedback_clip is not None:
        raise BadInput("`feedback_clip` is a setting of private_optimizer=efsgd; drop it or use "
                       "private_optimizer=efsgd")


def method_defaults(method) -> dict:
    """The finetune options a method accepts, with its defaults: its `finetune_defaults`, and for
    a DP-SGD method (not `own_mechanism`) the DP-SGD loop's own settings too."""
    own = method.finetune_defaults
    return dict(own) if method.own_mechanism else {**DPSGD_DEFAULTS, **own}


def adapt_to_size(method, values: dict, given: FinetuneOptions, dataset_size: int) -> list[tuple]:
    """Adapt, in `values` (the resolved options), the batch_size and epochs the user did not set
    to the declared N (rule and numbers: REFERENCE_SIZE above). Returns [(option, default, used)]
    for each value changed. Only methods whose batch_size and epochs make a DP-SGD schedule
    (`method.adapts_to_size`) take part; N is public (the declared size), so this reads no data."""
    if (not getattr(method, "adapts_to_size", False) or not 1 <= dataset_size < REFERENCE_SIZE
            or values.get("batch_size") is None or values.get("epochs") is None):
        return []
    changed = []
    batch, epochs = values["batch_size"], values["epochs"]  # the user's where given, else the defaults
    if given.batch_size is None:
        capped = min(batch, max(MIN_BATCH, math.floor(MAX_SAMPLE_RATE * dataset_size)), dataset_size)
        if capped != batch:
            changed.append(("batch_size", batch, capped))
            values["batch_size"] = batch = capped
    if given.epochs is None:
        # steps as privacy.plans.DPSGDPlan counts them: round(N / B) per epoch
        per_epoch = max(1, round(dataset_size / batch))
        reference = epochs * max(1, round(REFERENCE_SIZE / method_defaults(method)["batch_size"]))
        budget = epochs * max(1, round(REFERENCE_SIZE / batch))
        raised = max(epochs, math.floor(min(budget, max(reference, MIN_STEPS)) / per_epoch + 0.5))
        if raised != epochs:
            changed.append(("epochs", epochs, raised))
            values["epochs"] = raised
    return changed


def adapted_notes(adapted, dataset_size: int) -> list[str]:
    return [f"{key.replace('_', ' ')} {old} -> {new} for N = {dataset_size:,} (`{key}` not set; the default is "
            f"sized for {REFERENCE_SIZE:,} images)" for key, old, new in adapted]


def resolve_options(method, given: FinetuneOptions, dataset_size: int | None = None) -> FinetuneOptions:
    """Given options over the method's defaults, checked: the one resolution of a finetune.
    An option the method does not have (absent from its method_defaults) is refused. With
    `dataset_size` (the declared N), defaults the user did not set are adapted to it
    (`adapt_to_size`); the adapted values are listed in `adapted` and `notes`."""
    from ..key_values import parse_arch

    defaults = method_defaults(method)
    check_values(given)
    for key, value in given.given().items():
        if key not in defaults:
            known = ", ".join(f"`{k}`" for k in OPTIONS if k in defaults)
            raise BadInput(f"method {method.name!r} has no `{key}`; its finetune options: {known}")
    values = {k: (getattr(given, k) if getattr(given, k) is not None else defaults.get(k))
              for k in OPTIONS if k in defaults}
    train = dict(defaults.get("train_opts") or {})
    asked = parse_arch(given.train_opts, "`train_opts`") if given.train_opts is not None else {}
    unknown = sorted(set(asked) - set(train))
    if unknown:
        raise BadInput(f"`train_opts` key {unknown[0]!r} is not a setting of {method.name}; "
                       f"allowed: {', '.join(sorted(train)) or 'none'}")
    values["train_opts"] = {**train, **asked}
    notes = list(given.notes)
    adapted = adapt_to_size(method, values, given, dataset_size) if dataset_size is not None else []
    notes += adapted_notes(adapted, dataset_size)
    default_mode = values.get("grad_sample_mode")
    if (values.get("private_optimizer") == "efsgd" and default_mode in CLIPPED_SUM_MODES
            and given.grad_sample_mode is None):
        # it was only the method's default: say so, and record it, rather than swap silently.
        values["grad_sample_mode"] = "vmap"
        notes.append(f"grad_sample_mode=vmap instead of {method.name}'s default {default_mode}: "
                     f"private_optimizer=efsgd needs each example's gradient")
    opts = FinetuneOptions(**values, secure=given.secure, base_optimizer=given.base_optimizer, notes=tuple(notes),
                           adapted=tuple(adapted))
    check_values(opts)
    check_combination(opts)
    return opts
