"""Independent references for every recipe, written out from the seeds' algorithm boxes with plain
tensor arithmetic (no landscape.optim code): each class keeps its own state and returns the update
``u`` (``x ← x − η·u``) after one gradient. Seed 002 = Pan & Li (Algorithms 3-9, App. B.2), seed 001 =
Crawshaw et al. (Algorithm 1), seed 000 = the Smoothed SignSGD/NormSGD note (Definitions 1-2)."""

from __future__ import annotations

import math

import torch


def ref_clip(g: dict, frac: float, per_tensor: bool = False) -> dict:
    """Seed 002 App. B.2: τ = the |g| value that the top frac of coordinates reach (k-th largest |g|,
    k = round(frac·n), at least 1); g̃_i = sgn(g_i)·min(|g_i|, τ). Reference: a full descending sort."""

    def tau_of(values):
        flat = torch.cat([v.reshape(-1) for v in values]).abs()
        n = flat.numel()
        k = min(n, max(1, int(math.floor(frac * n + 0.5)))) if frac > 0 else 0
        if k == 0:
            return math.inf
        return float(torch.sort(flat, descending=True).values[k - 1])

    if per_tensor:
        taus = {n: tau_of([v]) for n, v in g.items()}
    else:
        t = tau_of(list(g.values()))
        taus = dict.fromkeys(g, t)
    return {n: torch.sign(v) * torch.minimum(v.abs(), torch.full_like(v, taus[n])) for n, v in g.items()}


def _zeros(g):
    return {n: torch.zeros_like(v) for n, v in g.items()}


class Ref:
    """Base: ``step(g) -> u``."""

    def __init__(self, **hp):
        self.hp = hp
        self.t = 0
        self.s = None

    def step(self, g):
        self.t += 1
        if self.s is None:
            self.s = self.init(g)
        return self.update(g)


class SGD(Ref):  # seed 002 Algorithm 3
    def init(self, g):
        return {"m": _zeros(g)}

    def update(self, g):
        b, clip = self.hp["beta"], self.hp.get("clip")
        gh = ref_clip(g, clip, self.hp.get("per_tensor", False)) if clip else g
        m = self.s["m"]
        for n in g:
            m[n] = b * m[n] + (1 - b) * gh[n]
        return {n: m[n].clone() for n in g}


class NormSGD(SGD):  # seed 002 Algorithm 4: v = m/‖m‖₂·√(mn) per weight matrix / vector
    def update(self, g):
        m = super().update(g)
        return {n: v / torch.linalg.vector_norm(v) * math.sqrt(v.numel()) for n, v in m.items()}


class SignSGD(SGD):  # seed 002 Algorithm 5: x ← x − η·sgn(m)
    def update(self, g):
        return {n: torch.sign(v) for n, v in super().update(g).items()}


class Adam(Ref):  # seed 002 Algorithm 6 (Kingma & Ba bias correction, ε outside the root)
    def init(self, g):
        return {"m": _zeros(g), "v": _zeros(g)}

    def grads(self, g):
        """(numerator input, second-moment input)."""
        clip = self.hp.get("clip")
        if clip and not self.hp.get("clip_update"):
            return ref_clip(g, clip, self.hp.get("per_tensor", False)), g  # numerator only (App. B.2)
        return g, g

    def update(self, g):
        b1, b2, eps = self.hp["beta1"], self.hp["beta2"], self.hp["eps"]
        gm, gv = self.grads(g)
        m, v, t = self.s["m"], self.s["v"], self.t
        u = {}
        for n in g:
            m[n] = b1 * m[n] + (1 - b1) * gm[n]
            v[n] = b2 * v[n] + (1 - b2) * gv[n] ** 2
            mhat = m[n] / (1 - b1**t)
            vhat = v[n] / (1 - b2**t)
            u[n] = mhat / (torch.sqrt(vhat) + eps)
        if self.hp.get("clip_update"):
            u = ref_clip(u, self.hp["clip"], self.hp.get("per_tensor", False))
        return u


class AdamValueClip(Adam):  # seed 000: Adam fed clip_[−α, α](G), both moments
    def grads(self, g):
        a = self.hp["alpha"]
        gc = {n: torch.clamp(v, -a, a) for n, v in g.items()}
        return gc, gc


class AdamNormClip(Adam):  # seed 000: Adam fed α/‖G‖·G when ‖G‖ ≥ α (global norm), both moments
    def grads(self, g):
        a = self.hp["alpha"]
        if self.hp.get("per_tensor"):
            gc = {n: v * min(1.0, a / float(torch.linalg.vector_norm(v))) for n, v in g.items()}
        else:
            norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
            gc = {n: v * min(1.0, a / norm) for n, v in g.items()}
        return gc, gc


class Adafactor(Ref):
    """Seed 002 Algorithm 7 (matrices; a tensor with more dims is a stack of matrices over its last
    two) and Algorithm 8 (vectors, scalars), the numerator optionally clipped (App. B.2)."""

    def init(self, g):
        s = {}
        for n, v in g.items():
            if v.dim() >= 2:
                s[n] = {"R": torch.zeros(v.shape[:-1], dtype=v.dtype), "C": torch.zeros(v.shape[:-2] + v.shape[-1:], dtype=v.dtype)}
            else:
                s[n] = {"V": torch.zeros_like(v)}
        return s

    def update(self, g):
        t = self.t
        beta_hat = 1 - t ** self.hp["decay_rate"]
        eps1, d = self.hp["eps1"], self.hp["d"]
        clip = self.hp.get("clip")
        gh = ref_clip(g, clip, self.hp.get("per_tensor", False)) if clip else g
        out = {}
        for n, G in g.items():
            st = self.s[n]
            if G.dim() >= 2:
                mats = G.reshape(-1, *G.shape[-2:])
                num = gh[n].reshape(-1, *G.shape[-2:])
                R = st["R"].reshape(mats.shape[0], -1)
                C = st["C"].reshape(mats.shape[0], -1)
                U = torch.empty_like(mats)
                for i in range(mats.shape[0]):
                    sq = mats[i] ** 2 + eps1
                    R[i] = beta_hat * R[i] + (1 - beta_hat) * sq @ torch.ones(sq.shape[1], dtype=sq.dtype)
                    C[i] = beta_hat * C[i] + (1 - beta_hat) * torch.ones(sq.shape[0], dtype=sq.dtype) @ sq
                    Vhat = torch.outer(R[i], C[i]) / R[i].sum()
                    U[i] = num[i] / torch.sqrt(Vhat)
                st["R"] = R.reshape(st["R"].shape)
                st["C"] = C.reshape(st["C"].shape)
                U = U.reshape(G.shape)
            else:
                st["V"] = beta_hat * st["V"] + (1 - beta_hat) * (G**2 + eps1)
                U = gh[n] / torch.sqrt(st["V"])
            rms = torch.linalg.vector_norm(U) / math.sqrt(U.numel())
            Uhat = U / max(1.0, float(rms) / d)
            if self.hp.get("relative_step"):
                x = self.hp["params"][n]
                rho = min(1e-2, 1 / math.sqrt(t))
                Uhat = Uhat * max(self.hp["eps2"], float(torch.linalg.vector_norm(x) / math.sqrt(x.numel()))) * rho
            out[n] = Uhat
        return out


class Lion(Ref):  # seed 002 Algorithm 9; lion_clip_update clips the interpolation instead of sgn
    def init(self, g):
        return {"m": _zeros(g)}

    def update(self, g):
        b1, b2 = self.hp["beta1"], self.hp["beta2"]
        m = self.s["m"]
        c = {n: b1 * m[n] + (1 - b1) * g[n] for n in g}
        u = ref_clip(c, self.hp["clip"], self.hp.get("per_tensor", False)) if self.hp.get("clip") else {n: torch.sign(v) for n, v in c.items()}
        for n in g:
            m[n] = b2 * m[n] + (1 - b2) * g[n]
        return u


class GenSignSGD(Ref):  # seed 001 Algorithm 1 (no bias correction; ε = 0 in the seed)
    def init(self, g):
        return {"m": _zeros(g), "v": _zeros(g)}

    def update(self, g):
        b1, b2, eps = self.hp["beta1"], self.hp["beta2"], self.hp["eps"]
        m, v = self.s["m"], self.s["v"]
        u = {}
        for n in g:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * m[n] ** 2
            u[n] = m[n] / (torch.sqrt(v[n]) + eps)
        return u


class SmoothedSignSGD(Ref):  # seed 000 Definition 1: M = βM + (1−β)sign(G)
    def init(self, g):
        return {"m": _zeros(g)}

    def update(self, g):
        b = self.hp["beta"]
        m = self.s["m"]
        for n in g:
            m[n] = b * m[n] + (1 - b) * torch.sign(g[n])
        return {n: m[n].clone() for n in g}


class SmoothedNormSGD(SmoothedSignSGD):  # seed 000 Definition 2: M = βM + (1−β)G/‖G‖
    def update(self, g):
        b = self.hp["beta"]
        m = self.s["m"]
        if self.hp.get("per_tensor"):
            gn = {n: v / torch.linalg.vector_norm(v) for n, v in g.items()}
        else:
            norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
            gn = {n: v / norm for n, v in g.items()}
        for n in g:
            m[n] = b * m[n] + (1 - b) * gn[n]
        return {n: m[n].clone() for n in g}


# name -> (reference class, the seeds' defaults written out again here, independently of the registry)
_ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
_ADAFACTOR = {"decay_rate": -0.8, "eps1": 1e-30, "d": 1.0, "eps2": 1e-3}
REFERENCES = {
    "sgd": (SGD, {"beta": 0.9}),
    "sgd_clip": (SGD, {"beta": 0.9, "clip": 0.1}),
    "normsgd": (NormSGD, {"beta": 0.9}),
    "normsgd_clip": (NormSGD, {"beta": 0.9, "clip": 0.1}),
    "signsgd": (SignSGD, {"beta": 0.9}),
    "adam": (Adam, dict(_ADAM)),
    "adam_clip": (Adam, {**_ADAM, "clip": 0.5}),
    "adam_clip_update": (Adam, {**_ADAM, "clip": 0.5, "clip_update": True}),
    "adafactor": (Adafactor, dict(_ADAFACTOR)),
    "adafactor_clip": (Adafactor, {**_ADAFACTOR, "clip": 0.5}),
    "lion": (Lion, {"beta1": 0.9, "beta2": 0.99}),
    "lion_clip_update": (Lion, {"beta1": 0.9, "beta2": 0.99, "clip": 0.5}),
    "gensignsgd": (GenSignSGD, {"beta1": 0.9, "beta2": 0.5, "eps": 0.0}),
    "smoothed_signsgd": (SmoothedSignSGD, {"beta": 0.9}),
    "smoothed_normsgd": (SmoothedNormSGD, {"beta": 0.9}),
    "adam_valueclip": (AdamValueClip, {**_ADAM, "alpha": 1e-6}),
    "adam_normclip": (AdamNormClip, {**_ADAM, "alpha": 1e-3}),
}


def make_reference(name: str, **overrides):
    cls, hp = REFERENCES[name]
    return cls(**{**hp, **overrides})
