"""The semantic query network: a small CNN classifier trained on PUBLIC data only.

It serves two purposes that both require it never saw sensitive data:
PrivImage's semantic query (top-k public classes of each sensitive image) and the
domain feature network for FID when Inception weights are unavailable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QueryNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, resolution: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"channels": channels, "num_classes": num_classes, "resolution": resolution,
                       "width": width, "feature_dim": feature_dim}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images normalised to [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def train_query_net(net: QueryNet, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, seed: int,
                    batch_size: int = 128, lr: float = 2e-3, progress=None) -> QueryNet:
    """Plain supervised training on public data, with light shift augmentation."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    net.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            x = normalise(images[idx])
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if progress:
                progress(step, epochs * steps_per_epoch, float(loss.detach()))
    net.eval()
    return net


@torch.no_grad()
def predict_topk(net: QueryNet, images: torch.Tensor, k: int, batch_size: int = 1024,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, k) indices (on the CPU) of each image's k most likely public classes, computed on `device`
    (the net moves there; each uint8 batch moves as is)."""
    net.to(device).eval()
    out = [net(normalise(images[i:i + batch_size].to(device))).topk(k, dim=1).indices
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).cpu()


@torch.no_grad()
def extract_features(net: QueryNet, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    net.eval()
    return torch.cat([net.features(normalise(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])
