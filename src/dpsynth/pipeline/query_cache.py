"""The public-only query network, trained once per (public data, resolution, architecture)
and cached; also the domain feature network for FID."""

from __future__ import annotations

import hashlib
import json

import torch

from ..data import ImageSet, content_digest
from ..models.query_net import QueryNet, train_query_net
from .rundir import atomic_write_bytes
from .common import Progress, cache_dir, no_progress, torch_bytes, torch_load_bytes

QUERY_EPOCHS = 5


def query_net_for(public: ImageSet, *, seed: int = 0, epochs: int = QUERY_EPOCHS,
                  progress: Progress = no_progress) -> tuple[QueryNet, str]:
    """(trained net, identity string). The identity names the data and weights hash."""
    if public.labels is None or public.num_classes < 2:
        raise ValueError(f"public dataset {public.name} needs labels to train the query classifier")
    _, c, r, _ = public.images.shape
    key_src = json.dumps({"public": content_digest(public), "c": c, "r": r, "epochs": epochs, "seed": seed, "v": 1})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_dir() / f"querynet-{key}.pt"
    net = QueryNet(channels=c, num_classes=public.num_classes, resolution=r)
    if path.is_file():
        data = path.read_bytes()
        net.load_state_dict(torch_load_bytes(data)["state_dict"])
    else:
        train_query_net(net, public.images, public.labels, epochs=epochs, seed=seed,
                        progress=lambda d, t, _loss: progress("train query net (public)", d, t))
        data = torch_bytes({"state_dict": net.state_dict(), "config": net.config, "public": content_digest(public)})
        atomic_write_bytes(path, data)
    net.eval()
    # The hash of the weights this process holds, not of the file: another process may replace it meanwhile.
    weights = hashlib.sha256(data).hexdigest()[:12]
    identity = f"querynet({public.name},{r}px,{c}ch):sha256:{weights}"
    return net, identity
