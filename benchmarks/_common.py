"""Shared setup for the benchmarks: the demo's causal LM on real text, timing helpers."""

from __future__ import annotations

import resource
import statistics
import time

import torch

from landscape.data import CharCorpus, kjv_text
from landscape.models import TinyCausalLM, lm_loss


def lm_setup(width=128, depth=2, batch=16, context=128, seed=0):
    """A causal LM (LayerNorm, attention) and a batch of ``batch × context`` tokens of KJV text."""
    torch.manual_seed(seed)
    corpus = CharCorpus(kjv_text()[:400_000])
    model = TinyCausalLM(corpus.vocab, width=width, depth=depth, heads=4, context=context)
    data = corpus.batch(batch, context, torch.Generator().manual_seed(seed))
    return model, lm_loss, data


def median_time(fn, repeats=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
