"""The one options object of private training, from the CLI to the loop (torch-free).

`dpsynth finetune` builds a `FinetuneOptions` from its flags (None: not given), the stage
resolves it ONCE against the method's defaults (`resolve_options`), and that resolved object
is what the method's plan, its trainer and the DP-SGD loop read. Names:
- `private_optimizer`: the private mechanism's optimizer, dpsgd or efsgd (flag --optimizer);
- `base_optimizer`: the update rule it feeds, adam or sgd (a loop setting, no flag).
"""

from __future__ import annotations

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


def resolve_options(method, given: FinetuneOptions) -> FinetuneOptions:
    """Given options over the method's defaults, checked: the one resolution of a finetune.
    An option the method does not have (absent from its method_defaults) is refused."""
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
    default_mode = values.get("grad_sample_mode")
    if (values.get("private_optimizer") == "efsgd" and default_mode in CLIPPED_SUM_MODES
            and given.grad_sample_mode is None):
        # it was only the method's default: say so, and record it, rather than swap silently.
        values["grad_sample_mode"] = "vmap"
        notes.append(f"grad_sample_mode=vmap instead of {method.name}'s default {default_mode}: "
                     f"private_optimizer=efsgd needs each example's gradient")
    opts = FinetuneOptions(**values, secure=given.secure, base_optimizer=given.base_optimizer, notes=tuple(notes))
    check_values(opts)
    check_combination(opts)
    return opts
