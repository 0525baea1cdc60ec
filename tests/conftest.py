"""Shared fixtures: headless matplotlib, figures closed and RNGs seeded around every test, and a
realistic synthetic run (see ``tests/_synthetic.py``)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

# One OpenMP thread for the whole suite (and the processes it starts): its models are tiny, and two
# threads on a shared 2-core machine are 3-10x slower than one. Read by torch when it is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere: tests never need a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `from tests._synthetic import ...` whichever way pytest is started
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _isolate_test():
    """Seed every RNG a test may use, and close every figure it left open."""
    random.seed(0)
    np.random.seed(0)
    torch = sys.modules.get("torch")  # seeded when some test already imported it; never imported here
    if torch is not None:
        torch.manual_seed(0)
    yield
    plt.close("all")


@pytest.fixture
def synthetic_run(tmp_path):
    """A complete fake run (17 recipes + the trained direction, steps 0/50/100, smoothness tables),
    written through the store API and loaded back as a :class:`landscape.store.Run`."""
    from landscape.store import load_run
    from tests._synthetic import write_synthetic_run

    return load_run(write_synthetic_run(tmp_path / "run"))
