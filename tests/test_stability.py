"""Edge of stability: the thresholds of Cohen et al. (2021, 2022), and the Adam preconditioner read
from a recipe's state and from a torch.optim.Adam, against torch.optim.Adam's own step."""

from __future__ import annotations

import pytest
import torch

import landscape as ls
from tests._models import MLP


def test_stability_thresholds():
    assert ls.stability_threshold(0.1) == pytest.approx(20.0)
    assert ls.stability_threshold(0.1, "SGD", momentum=0.9) == pytest.approx(38.0)
    assert ls.stability_threshold(0.1, "sgd", momentum=0.9, nesterov=True) == pytest.approx(3.8 / 2.8 / 0.1)
    assert ls.stability_threshold(0.1, "SGD", momentum=0.9, dampening=0.9) == pytest.approx(380.0)
    assert ls.stability_threshold(1e-3, "Adam", betas=(0.9, 0.999)) == pytest.approx(38_000.0)
    assert ls.stability_threshold(1e-3, "AdamW", betas=[0.95, 0.999]) == pytest.approx((2 + 1.9) / 0.05 / 1e-3)
    assert ls.stability.stability_multiplier("Adam") == (pytest.approx(38.0), "preconditioned")
    assert ls.stability.stability_multiplier("Adagrad") is None
    with pytest.raises(ValueError, match="no stability threshold"):
        ls.stability_threshold(0.1, "Lion")
    with pytest.raises(ValueError, match="lr"):
        ls.stability_threshold(0.0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_is_what_adam_divides_its_momentum_by(amsgrad):
    """torch.optim.Adam steps x ← x − η·m/P with m its raw EMA (exp_avg) and
    P = (1 − β₁ᵗ)(√(v/(1 − β₂ᵗ)) + ε) (Cohen et al. 2022, §2): check P·(x_t − x_{t+1})/η = m, and that
    the ``adam`` recipe, fed the same gradients, holds the same P."""
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    lr = 1e-2
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.8, 0.99), eps=1e-6, amsgrad=amsgrad)
    pseudo = ls.PseudoUpdates(model.named_parameters(), {"adam": ls.optim.recipe("adam", beta1=0.8, beta2=0.99,
                                                                                      eps=1e-6)})
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pseudo.observe({n: p.grad for n, p in model.named_parameters()})
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    P = ls.adam_preconditioner(opt, model)
    for n, p in model.named_parameters():
        m = opt.state[p]["exp_avg"]
        torch.testing.assert_close(P[n] * (before[n] - p.detach()) / lr, m, rtol=1e-9, atol=1e-14)
    if not amsgrad:
        Pr = pseudo.preconditioner("adam")
        for n in P:
            torch.testing.assert_close(Pr[n], P[n], rtol=1e-9, atol=1e-14)
        # the recipe's direction is m/P
        u = pseudo.direction("adam")
        for n, p in model.named_parameters():
            torch.testing.assert_close(u[n] * P[n], opt.state[p]["exp_avg"], rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="no Adam second moment"):
        ls.PseudoUpdates(model.named_parameters(), ["sgd"]).preconditioner("sgd")
    with pytest.raises(TypeError, match="Adam"):
        ls.adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1), model)
