"""Specs for ``landscape race`` tests: a tiny MLP classifier (initialised from torch's RNG, so each race
seed has its own initialisation) with a fixed list of training batches."""

from __future__ import annotations

import torch
from torch import nn

D_IN, HIDDEN, CLASSES = 5, 8, 3


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def data(seed: int = 7, n: int = 6, size: int = 16):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D_IN, CLASSES, generator=gen)
    out = []
    for _ in range(n + 1):
        x = torch.randn(size, D_IN, generator=gen)
        out.append((x, (x @ w).argmax(1)))
    return out[0], out[1:]  # probe batch, training batches


def build():
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
    probe, train = data()
    return model, loss_fn, probe, train


def no_train_batches():
    model, loss, probe, _ = build()
    return model, loss, probe


def own_generator_loader():
    """A DataLoader shuffling with its own generator: every pass differs, so two runs see other batches."""
    model, loss, probe, train = build()
    x = torch.cat([b[0] for b in train])
    y = torch.cat([b[1] for b in train])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    return model, loss, probe, loader


def seeded_probe_batch():
    """A probe batch drawn from torch's global RNG: it changes with the race's seed."""
    model, loss, _, train = build()
    return model, loss, (torch.randn(4, D_IN), torch.randint(0, CLASSES, (4,))), train


def regression():
    """Least squares on a linear model: a step size past 2/λ_max diverges geometrically."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, D_IN, generator=gen)
    y = x @ torch.randn(D_IN, 1, generator=gen)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    return nn.Linear(D_IN, 1), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), (x, y), batches
