"""RecipeOptimizer: parity with the torch.optim classes that implement a recipe exactly, training on a
quadratic, equality with the pseudo-update, and state_dict round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import landscape.optim as lo

NAMES = lo.recipe_names()


class Quadratic(torch.nn.Module):
    """f(x) = ½ Σ_i a_i (x_i − c_i)² over a matrix and a vector parameter (ill-conditioned)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=dtype))
        self.b = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=dtype))
        self.register_buffer("aw", torch.logspace(-1, 1, 24, dtype=dtype).reshape(6, 4))
        self.register_buffer("ab", torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=dtype))
        self.register_buffer("cw", torch.randn(6, 4, generator=gen, dtype=dtype))

    def forward(self):
        return 0.5 * (self.aw * (self.w - self.cw) ** 2).sum() + 0.5 * (self.ab * self.b**2).sum()


def run(model, opt, steps, noise=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model()
        loss.backward()
        if noise:
            for p in model.parameters():
                p.grad.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * noise)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def assert_params_close(m1, m2, rtol, atol, what=""):
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        if not torch.allclose(p1, p2, rtol=rtol, atol=atol):
            raise AssertionError(f"{what} {n}: max |diff| {float((p1 - p2).abs().max()):.3g}")


# --- parity with torch.optim ---------------------------------------------------------------------------


def test_sgd_parity_without_dampening():
    """torch.optim.SGD(momentum=β, dampening=0) keeps b_t = β b_{t−1} + g_t = m_t/(1−β) (b_1 = g_1, m_0 = 0),
    so it equals the `sgd` recipe with the learning rate η/(1−β)."""
    beta, lr = 0.9, 0.01
    m1, m2 = Quadratic(), Quadratic()
    run(m1, torch.optim.SGD(m1.parameters(), lr=lr, momentum=beta), 30, noise=0.1)
    run(m2, lo.RecipeOptimizer(m2.parameters(), "sgd", lr=lr / (1 - beta), beta=beta), 30, noise=0.1)
    assert_params_close(m1, m2, rtol=1e-12, atol=1e-12, what="SGD")


def test_sgd_dampening_convention_differs_by_the_first_gradient():
    """torch.optim.SGD(momentum=β, dampening=β) starts its buffer at b_1 = g_1 (no dampening on the first
    step), then b_t = β b_{t−1} + (1−β) g_t; so b_t = m_t + β^t·g_1 where m_t is the seed's (and our)
    m_t = β m_{t−1} + (1−β) g_t from m_0 = 0. The difference decays but is not zero."""
    beta = 0.9
    gen = torch.Generator().manual_seed(1)
    x = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=1.0, momentum=beta, dampening=beta)
    pu = lo.PseudoUpdates({"x": x}, ["sgd"])
    g1 = None
    for t in range(1, 8):
        g = torch.randn(5, generator=gen, dtype=torch.float64)
        g1 = g if g1 is None else g1
        pu.observe({"x": g})
        before = x.detach().clone()
        x.grad = g.clone()
        opt.step()
        torch_update = before - x.detach()  # = b_t
        ours = pu.directions()["sgd"]["x"]
        assert torch.allclose(torch_update, ours + beta**t * g1, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(torch_update, ours, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_parity(weight_decay):
    m1, m2 = Quadratic(), Quadratic()
    run(m1, torch.optim.Adam(m1.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay), 40, noise=0.3)
    opt = lo.RecipeOptimizer(m2.parameters(), "adam", lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=weight_decay)
    run(m2, opt, 40, noise=0.3)
    assert_params_close(m1, m2, rtol=1e-10, atol=1e-12, what="Adam")


def test_adamw_parity_with_decoupled_weight_decay():
    m1, m2 = Quadratic(), Quadratic()
    run(m1, torch.optim.AdamW(m1.parameters(), lr=0.05, weight_decay=0.2), 40, noise=0.3)
    run(m2, lo.RecipeOptimizer(m2.parameters(), "adam", lr=0.05, weight_decay=0.2, decoupled_weight_decay=True), 40, noise=0.3)
    assert_params_close(m1, m2, rtol=1e-10, atol=1e-12, what="AdamW")


def test_adam_parity_float32():
    m1, m2 = Quadratic(torch.float32), Quadratic(torch.float32)
    run(m1, torch.optim.Adam(m1.parameters(), lr=0.01), 20, noise=0.3)
    run(m2, lo.RecipeOptimizer(m2.parameters(), "adam", lr=0.01), 20, noise=0.3)
    assert_params_close(m1, m2, rtol=1e-5, atol=1e-6, what="Adam float32")


def test_adafactor_parity_with_torch():
    """torch.optim.Adafactor is seed 002 Algorithms 7-8 with the relative step size (ρ_t = min(lr, 1/√t),
    so lr=1e-2 is the seed's ρ) and update clipping d, factoring the last two dims. It differs only in
    where ε₁ enters (torch: max(1ᵀR, ε₁) and max(√V̂, ε₁); seed: G² + ε₁) and in row/column means
    instead of sums (V̂ is unchanged). With ε₁ = 1e-30 in both, in float64, the two agree."""
    m1, m2 = Quadratic(), Quadratic()
    run(m1, torch.optim.Adafactor(m1.parameters(), lr=1e-2, eps=(1e-30, 1e-3), d=1.0), 30, noise=0.3)
    run(m2, lo.RecipeOptimizer(m2.parameters(), "adafactor", lr=1.0, relative_step=True), 30, noise=0.3)
    assert_params_close(m1, m2, rtol=1e-10, atol=1e-13, what="Adafactor")


def test_adafactor_default_eps_is_not_the_seed():
    """torch's default ε₁ (float eps) inside max(√V̂, ε₁) is not the seed's 1e-30 inside G² + ε₁: on tiny
    gradients the two differ, so there is no exact parity with torch's defaults."""
    x1 = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    x2 = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    o1 = torch.optim.Adafactor([x1], lr=1e-2)
    o2 = lo.RecipeOptimizer([x2], "adafactor", lr=1.0, relative_step=True)
    g = torch.full((4,), 1e-17, dtype=torch.float64)  # g² below both ε's: torch 1e-17/2.2e-16, seed 1e-17/1e-15
    for o, x in ((o1, x1), (o2, x2)):
        x.grad = g.clone()
        o.step()
    assert not torch.allclose(x1, x2, rtol=1e-6, atol=0)


# --- training --------------------------------------------------------------------------------------------

# Numerator-only clipping keeps the large-gradient coordinates' steps at τ/√v̂ ≪ 1 while v̂ (β2 = 0.999)
# still remembers the large early gradients, and lion_clip_update's steps are the clipped interpolation
# (≤ τ): on this ill-conditioned quadratic they are slow, though they descend.
SLOW = {"adam_clip": 0.9, "adafactor_clip": 0.9, "lion_clip_update": 0.5}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_optimizer_lowers_quadratic(name):
    model = Quadratic()
    opt = lo.RecipeOptimizer(model.parameters(), name, lr=0.05)
    losses = run(model, opt, 150)
    assert losses[-1] < SLOW.get(name, 0.2) * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_step_equals_pseudo_update(name):
    """For the same gradients, RecipeOptimizer moves x by exactly −lr·u with u from PseudoUpdates."""
    model = Quadratic()
    lr = 0.03
    kw = {"relative_step": True} if name == "adafactor" else {}  # also cover the parameter-reading atom
    opt = lo.RecipeOptimizer(model.parameters(), name, lr=lr, **kw)
    pu = lo.PseudoUpdates(model.named_parameters(), {name: lo.recipe(name, **kw)})
    for _ in range(4):
        opt.zero_grad()
        model().backward()
        pu.observe({n: p.grad for n, p in model.named_parameters()})
        u = pu.directions()[name]  # before the step: relative_step reads x_{t−1}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():
            assert torch.allclose(p.detach(), before[n] - lr * u[n], rtol=1e-12, atol=1e-14), n


def test_param_groups_share_the_global_clip_threshold():
    """Global clipping takes one threshold over every parameter of the optimizer, across groups."""
    w = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    opt = lo.RecipeOptimizer([{"params": [w]}, {"params": [b], "lr": 2.0}], "sgd_clip", lr=1.0, beta=0.0, clip=0.1)
    w.grad = torch.arange(10.0, dtype=torch.float64)
    b.grad = torch.arange(10.0, 20.0, dtype=torch.float64)
    opt.step()
    # 20 coordinates, k = 2: τ = 18; only b's 18, 19 reach it
    assert torch.equal(-w.detach(), torch.arange(10.0, dtype=torch.float64))
    expected_b = torch.arange(10.0, 20.0, dtype=torch.float64).clamp(max=18.0) * 2.0
    assert torch.equal(-b.detach(), expected_b)


def test_state_dict_round_trip_resumes_exactly():
    m1 = Quadratic()
    opt1 = lo.RecipeOptimizer(m1.parameters(), "adam_clip", lr=0.01)
    run(m1, opt1, 5, noise=0.2, seed=1)
    sd = copy.deepcopy(opt1.state_dict())
    m2 = copy.deepcopy(m1)
    opt2 = lo.RecipeOptimizer(m2.parameters(), "adam_clip", lr=0.01)
    opt2.load_state_dict(sd)
    assert any(k.startswith("ema_sq(beta=0.999)") for k in sd["state"][0])
    run(m1, opt1, 5, noise=0.2, seed=2)
    run(m2, opt2, 5, noise=0.2, seed=2)
    assert_params_close(m1, m2, rtol=0, atol=0, what="resumed")


def test_recipe_optimizer_validates():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        lo.RecipeOptimizer(p, "sgd", lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta"):
        lo.RecipeOptimizer(p, "sgd", beta=1.0)
    with pytest.raises(TypeError, match="can only be given with a recipe name"):
        lo.RecipeOptimizer(p, lo.recipe("sgd"), beta=0.5)
    with pytest.raises(TypeError, match="chained from landscape.optim atoms"):
        lo.RecipeOptimizer(p, lo.Transform(lambda x: {}, lambda g, s, p=None: (g, s)))


def test_skips_parameters_without_grad_and_closure():
    w = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = lo.RecipeOptimizer([w, frozen], "signsgd", lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert math.isclose(float(loss.detach()), 3.0)
    assert torch.allclose(w.detach(), torch.full((3,), 0.9))
    assert torch.equal(frozen.detach(), torch.ones(3))
    assert len(opt.state[frozen]) == 0
