"""Progress in words: the time-left model, the two output forms, the probe's ``progress=True``; the
thread-count choice; naming the optimizer of a saved state."""

from __future__ import annotations

import io

import pytest
import torch

from landscape._optimizer_class import optimizer_class_from_state
from landscape._progress import Progress, format_seconds
from landscape._threads import choose_threads
from landscape.measure import MeasureSettings
from landscape.models import TinyCausalLM, lm_loss
from landscape.probe import Probe

FAST = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2, hist_bins=8, method="hvp")


@pytest.fixture(autouse=True)
def _one_thread():
    """Two torch threads on a shared 2-core machine are much slower than one (see benchmarks/threads.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(total: int = 300, every: int = 60, step_s: float = 0.05, first: float = 4.0, later: float = 2.0,
             tty: bool = False) -> tuple[Progress, list[tuple[float, float]], str]:
    """A demo-shaped job: cheap steps, a measurement at step 1 and every ``every`` steps (the first
    one slower); returns (progress, [(estimate, truth) after each step], output)."""
    clock, out = Clock(), io.StringIO()
    due = [i for i in range(1, total + 1) if i == 1 or i % every == 0]
    p = Progress("landscape demo", total=total, measured_at=lambda i: i in due, stream=out, tty=tty, clock=clock)
    pairs = []
    for i in range(1, total + 1):
        clock.t += step_s
        if i in due:
            for phase, k in (("sharpness", 0), ("lines", 1), ("lines", 18)):
                p.measuring(i, 18, phase, k, 18 if k else 0)
            clock.t += first if i == 1 else later
            p.measured()
        p.step(i, loss=2.0)
        remaining = (total - i) * step_s + sum(1 for j in due if j > i) * later
        pairs.append((p.eta(), remaining))
    return p, pairs, out.getvalue()


def test_time_left_follows_the_cost_model_and_does_not_swing():
    _, pairs, _ = simulate()
    for estimate, truth in pairs:
        assert estimate is not None
        if truth > 1:
            assert truth / 1.5 <= estimate <= truth * 1.5, (estimate, truth)  # never off by 3x
    # after a second measurement the first one's one-off cost no longer counts
    _, pairs, _ = simulate()
    estimate, truth = pairs[130]
    assert estimate == pytest.approx(truth, rel=1e-6)
    # it never rises: a speed-based estimate would rise by about the cost of a measurement at each one
    assert all(b[0] <= a[0] + 1e-9 for a, b in zip(pairs, pairs[1:]))


def test_outside_a_terminal_one_line_per_measurement():
    _, _, text = simulate(total=120, every=60)
    lines = text.splitlines()
    assert len(lines) == 3  # steps 1, 60 and 120
    assert lines[0] == ("landscape demo: step 0/120 · measuring 18 directions at step 1 · 0:00, "
                        "time left known after the first measurement")
    assert lines[1].startswith("landscape demo: step 59/120 · loss 2.000 · measuring 18 directions at step 60 · 0:07, about")
    assert "\r" not in text and "\x1b" not in text


def test_in_a_terminal_one_status_line_rewritten():
    p, _, text = simulate(total=120, every=60, tty=True)
    assert "\n" not in text and text.count("\r") >= 3
    assert "measuring 18 directions at step 60 (sharpness)" in text  # redrawn at most 5 times a second
    p.note("writing figures")
    p.close()
    assert p.stream.getvalue().endswith("landscape demo: writing figures\n")


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 5.4, 75, 3725)] == ["0:00", "0:05", "1:15", "1:02:05"]


def test_the_probe_says_what_it_measures_when_asked(tmp_path, capsys):
    torch.manual_seed(0)
    model = TinyCausalLM(13, width=16, depth=1, heads=2, context=8)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 13, (4, 8), generator=gen)
    probe_batch = (batch, torch.roll(batch, -1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    phases = []
    with Probe(model, lm_loss, probe_batch, out=tmp_path / "run", every=2, recipes=["sgd", "adam"], settings=FAST,
               progress=True) as probe:
        probe.attach(opt)
        for _ in range(2):
            loss = lm_loss(model, probe_batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
    err = capsys.readouterr().err.splitlines()  # captured: not a terminal, one line per measurement
    assert [line.split(" in ")[0] for line in err] == ["landscape probe: measured 3 directions at step 1",
                                                       "landscape probe: measured 3 directions at step 2"]
    quiet_out = tmp_path / "quiet"
    with Probe(model, lm_loss, probe_batch, out=quiet_out, every=1, recipes=["sgd"], settings=FAST) as probe:
        probe.attach(opt)
        loss = lm_loss(model, probe_batch)
        loss.backward()
        opt.step()
    assert capsys.readouterr().err == ""  # off by default
    # measure_step reports its phases in order
    from landscape.measure import measure_step
    from landscape.objective import Objective

    obj = Objective(model, lm_loss, probe_batch)
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    u = {n: torch.randn_like(p) for n, p in x.items()}
    measure_step(obj, 1, x, {"a": u, "b": u}, x_next={n: v + 1e-3 * u[n] for n, v in x.items()}, settings=FAST,
                 progress=lambda phase, i, n: phases.append((phase, i, n)))
    # geometry first; "b" is "a" (the same direction), so it is measured once: one line
    assert phases == [("histograms and cosines", 0, 0), ("sharpness", 0, 0), ("lines", 1, 1), ("smoothness", 0, 0)]


def test_thread_choice():
    assert choose_threads(3) == (3, "3 threads (--threads)")
    assert choose_threads("auto", environ={"OMP_NUM_THREADS": "4"}) == (None, "OMP_NUM_THREADS=4")
    n, why = choose_threads("auto", torch_default=2, cpus=2, load=2.6, environ={})
    assert n == 1 and "load average 2.6" in why  # a busy 2-core machine: one thread
    assert choose_threads("auto", torch_default=8, cpus=8, load=0.3, environ={})[0] == 8  # an idle laptop: all
    assert choose_threads("auto", torch_default=8, cpus=16, load=0.0, environ={})[0] == 8  # never above torch's default
    assert choose_threads(None, torch_default=16, cpus=16, load=5.2, environ={})[0] == 11
    for bad in (0, -1, "two"):
        with pytest.raises(ValueError, match="threads must be 'auto' or a positive integer"):
            choose_threads(bad)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "NAdam", "RAdam", "Adamax", "Adagrad",
                                  "Adadelta", "Adafactor", "ASGD", "Rprop"])
def test_the_optimizer_class_from_its_saved_state(name):
    from landscape.checkpoints import _dict_hyperparameters

    opt = getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(3, 2))], lr=0.1)
    hyper = _dict_hyperparameters({"optimizer": opt.state_dict()})  # what analyze reads from a checkpoint
    assert optimizer_class_from_state(hyper) == name


def test_the_optimizer_class_when_the_keys_cannot_tell():
    old_adam = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
    assert optimizer_class_from_state(old_adam) == "Adam or AdamW"  # a torch without decoupled_weight_decay
    assert optimizer_class_from_state({"lr": 1.0, "my_knob": 3}) is None
    assert optimizer_class_from_state({}) is None


def test_the_start_up_time_does_not_count_as_a_step():
    clock = Clock()
    p = Progress("x", total=100, measured_at=lambda i: False, stream=io.StringIO(), tty=False, clock=clock)
    clock.t = 5.0  # loading data, building the model
    p.step(1)
    assert p.eta() == pytest.approx(99 * 5.0)  # one step known: all we can say
    for i in range(2, 11):
        clock.t += 0.1
        p.step(i)
    assert p.eta() == pytest.approx(90 * 0.1)  # the steps since: 0.1 s each
