"""Stage `select-public`: PrivImage's semantic distribution query (one Gaussian release)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..methods import get_method
from ..models.query_net import predict_topk
from ..privacy.accountant import compose_epsilon, epsilon_upper
from ..privacy.plans import gaussian_release_sigma
from ..privacy.events import GaussianEvent
from ..mechanisms.semantic_query import add_gaussian_noise, flat_rows, select_public_classes, semantic_histogram
from .lifecycle import stage_run
from .rundir import now
from .names import SELECT_PUBLIC as STAGE, SELECTION
from ..validation import check_positive
from .common import (DataSettings, Progress, load_public, public_record, no_progress,
                     open_or_create_run, settings_from_run)
from ..training.device import resolve_device
from .query_cache import query_net_for



def _skipped(method: str) -> dict:
    return {"skipped": True, "reason": f"method {method!r} does not use select-public; run 'dpsynth pretrain' "
                                       f"or 'dpsynth finetune' next"}


def run_select_public(run_path: str | Path, settings: DataSettings, *, sigma: float | None = None,
                      eps_query: float | None = None, top_k: int = 1, select: int | None = None,
                      delta: float | None = None, method: str | None = None, device: str | None = None,
                      progress: Progress = no_progress) -> dict:
    started = now()  # loading, the query network and the labelling come before the stage's entry opens
    if method is not None and not get_method(method).uses_public_selection:
        return _skipped(method)

    if (sigma is None) == (eps_query is None):
        raise BadInput("give exactly one of `sigma` (noise multiplier) or `eps_query` (epsilon of the query)")
    if sigma is not None:
        check_positive("sigma", sigma)
    if eps_query is not None:
        check_positive("eps_query", eps_query)
    check_positive("top_k", top_k, integer=True)
    torch_device = resolve_device(device)  # refused before the run is created
    if not settings.public:
        raise BadInput("select-public needs `public` NAME (a labelled public dataset)")
    run, sensitive = open_or_create_run(run_path, method=method, settings=settings, delta=delta)
    if not get_method(run.manifest["method"]).uses_public_selection:
        return _skipped(run.manifest["method"])
    data = replace(settings_from_run(run) if run.manifest.get('stages') else settings, public=settings.public)
    run.manifest['settings']['public'] = settings.public
    public = load_public(data, sensitive)
    if top_k > public.num_classes:
        raise BadInput(f"top_k={top_k} exceeds the {public.num_classes} classes of public dataset {public.name}")
    rows = sensitive.num_classes if sensitive.labels is not None else 1
    n_select = select if select is not None else min(public.num_classes, max(rows, 1))
    if not (1 <= n_select <= public.num_classes):
        raise BadInput(f"select={n_select} must be between 1 and {public.num_classes} (public classes)")
    if eps_query is not None:
        sigma = gaussian_release_sigma(run.events(), epsilon_upper(run.events(), run.delta) + eps_query,
                                       run.delta, stage=STAGE, param="eps_query", given=eps_query,
                                       what="its query")

    net, net_identity = query_net_for(public, seed=settings.seed, progress=progress)
    topk = predict_topk(net, sensitive.images, top_k, device=torch_device)
    hist = semantic_histogram(topk, sensitive.labels, rows, public.num_classes)

    event = GaussianEvent(stage=STAGE, noise_multiplier=float(sigma))
    eps_after = compose_epsilon([*run.events(), event], run.delta).upper
    run.manifest["public"] = public_record(public)
    config = {"sigma": float(sigma), "eps_query": eps_query, "top_k": top_k, "select": n_select,
              "query_network": net_identity, "device": str(torch_device)}
    # The event is written before the noisy histogram exists.
    with stage_run(run, STAGE, config, events=[event], started=started):
        noisy = add_gaussian_noise(hist, sigma, top_k)
        # Bonferroni over the rows: at alpha 0.01 each, a pure-noise release of 10 rows would be judged
        # flat everywhere only 90% of the time (0.99^10); at 0.01 / rows, at least 99%.
        flat = flat_rows(noisy, sigma, top_k, alpha=0.01 / rows)
        if len(flat) == rows:
            # No public class fits better than chance: a "selection" would be noise. Pretrain on the whole
            # public set instead (labels folded onto the sensitive classes, as pretraining without selection).
            chosen = [(c, c % rows) for c in range(public.num_classes)]
        else:
            chosen = select_public_classes(noisy, n_select)
        selected_classes = [p for p, _ in chosen]
        indices = np.nonzero(np.isin(public.labels.numpy(), selected_classes))[0]
        selection = {
            "public": public.name,
            "noise_multiplier": float(sigma),
            "top_k": top_k,
            "noisy_histogram": np.round(noisy, 3).tolist(),  # the DP release itself
            "selected": [{"public_class": p, "sensitive_class": r,
                          "public_class_name": (public.class_names[p] if public.class_names else str(p))}
                         for p, r in chosen],
            "public_indices": indices.tolist(),
            "flat_rows": flat,
        }
        if flat:
            selection["flat_warning"] = _flat_warning(flat, rows, public.name)
        run.write_artifact(STAGE, SELECTION, json.dumps(selection).encode())
    extra = {"warning": selection["flat_warning"]} if flat else {}
    return {**extra, "epsilon_spent": eps_after, "noise_multiplier": float(sigma), "selected": selection["selected"],
            "public_images": int(len(indices)), "public_fraction": len(indices) / len(public),
            "query_network": net_identity, "delta": run.delta}


def _flat_warning(flat: list[int], rows: int, public: str) -> str:
    if len(flat) == rows:
        return (f"the noisy semantic histogram is flat: no class of public set {public} fits the sensitive data "
                f"better than chance, so none was selected and pretraining uses the whole public set; a public "
                f"set of the sensitive domain, or a method without public pretraining, may serve better")
    return (f"for sensitive classes {flat} the noisy semantic histogram is flat (no class of public set {public} "
            f"fits them better than chance); their selected public classes are arbitrary")
