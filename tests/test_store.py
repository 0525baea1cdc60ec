"""Run store: round trips (NaN/inf, arrays, JSON), schema validation, resume, settings mismatch,
read-while-writing and survival of a SIGKILLed writer."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from landscape import store as st
from landscape.store import (
    TABLES,
    Column,
    NotARunError,
    RunMismatchError,
    RunStore,
    SchemaError,
    Table,
    load_run,
)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"every": 10, "delta": 0.01, "recipes": ["sgd", "adam"], "line": {"points": 5}}


def sharp_row(step: int, direction: str, **kw) -> dict:
    row = {"step": step, "direction": direction, "sharpness": 1.5, "raw": 1.5, "shifted": False,
           "grad_correlation": 0.25, "update_norm": 3.0, "loss": 2.0}
    row.update(kw)
    return row


@pytest.fixture
def store(tmp_path):
    with RunStore(tmp_path / "run", settings=SETTINGS, meta={"recipes": ["sgd", "adam"]}) as s:
        yield s


# -- schema declarations ---------------------------------------------------------------------------


def test_tables_declare_the_documented_schema():
    expected_pk = {
        "meta": ("key",), "steps": ("step",), "sharpness": ("step", "direction"), "lines": ("step", "direction"),
        "histograms": ("step", "direction"), "cosine": ("step", "a", "b"), "smoothness": ("step",),
        "coord_smoothness": ("step", "layer"), "robust": ("step",), "events": ("id",),
        "planes": ("name",), "plane_losses": ("name", "objective", "start"), "plane_trajectory": ("name", "position"),
        "race_runs": ("recipe", "lr", "seed"), "race_curves": ("recipe", "lr", "seed", "step"),
        # curvature (landscape.curvature_measure)
        "eigenvalues": ("step", "curvature", "block", "which", "rank"), "trace": ("step", "curvature", "method"),
        "density": ("step", "curvature"), "preconditioned": ("step", "optimizer", "curvature"),
        "sharpness_layers": ("step", "direction", "curvature", "block"),
    }
    assert {name: t.primary_key for name, t in TABLES.items()} == expected_pk
    sharp = TABLES["sharpness"].by_name
    assert sharp["ratio_to_sgd"].nullable and sharp["shifted_value"].nullable and sharp["best_step"].nullable
    assert not sharp["sharpness"].nullable
    assert TABLES["lines"].by_name["s"].kind == "ARRAY"
    assert TABLES["histograms"].by_name["counts"].dtype == "int64"


def test_table_declaration_is_validated():
    with pytest.raises(ValueError, match="kind"):
        Column("x", "FLOAT")
    with pytest.raises(ValueError, match="identifier"):
        Column("bad name", "REAL")
    with pytest.raises(ValueError, match="primary key column 'nope'"):
        Table("t", (Column("a", "REAL"),), ("nope",))


def test_schema_doc_is_in_sync():
    doc = (ROOT / "docs" / "store_schema.md").read_text(encoding="utf-8")
    assert st.schema_markdown() in doc, "regenerate the tables section with `python -m landscape.store`"
    assert "#### `sharpness`" in (st.__doc__ or "#### `sharpness`")


# -- round trips -----------------------------------------------------------------------------------


def test_real_columns_keep_inf_and_map_nan_deliberately(store):
    store.write("sharpness", [
        sharp_row(0, "sgd", sharpness=math.nan, raw=math.inf, grad_correlation=-math.inf,
                  ratio_to_sgd=math.nan, shifted_value=None),
        sharp_row(0, "adam", ratio_to_sgd=0.5, best_step=2.0),
    ])
    run = load_run(store.path)
    sgd, adam = run.rows("sharpness")[1], run.rows("sharpness")[0]
    assert (sgd["direction"], adam["direction"]) == ("sgd", "adam")  # ordered by primary key
    # non-nullable REAL: NaN comes back as NaN, inf as inf
    assert math.isnan(sgd["sharpness"]) and sgd["raw"] == math.inf and sgd["grad_correlation"] == -math.inf
    # nullable REAL: missing (None or NaN) comes back as None in rows() ...
    assert sgd["ratio_to_sgd"] is None and sgd["shifted_value"] is None and sgd["best_step"] is None
    assert adam["ratio_to_sgd"] == 0.5 and adam["best_step"] == 2.0
    # ... and as NaN in columns() / df()
    cols = run.columns("sharpness")
    assert cols["ratio_to_sgd"].dtype == np.float64
    np.testing.assert_array_equal(cols["ratio_to_sgd"], [0.5, np.nan])
    np.testing.assert_array_equal(cols["raw"], [1.5, np.inf])
    assert cols["shifted"].dtype == bool and cols["step"].dtype == np.int64
    # SQL aggregates see NULL, not a fake number
    assert run.query("SELECT COUNT(sharpness) AS n FROM sharpness")[0]["n"] == 1


def test_bool_and_integer_columns(store):
    store.write("sharpness", [sharp_row(np.int64(3), "sgd", shifted=np.bool_(True)), sharp_row(4.0, "sgd", shifted=0)])
    rows = load_run(store.path).rows("sharpness")
    assert [r["step"] for r in rows] == [3, 4] and all(type(r["step"]) is int for r in rows)
    assert [r["shifted"] for r in rows] == [True, False]


def test_arrays_round_trip_exactly_with_nan_and_inf(store):
    import torch

    s = np.linspace(0.0, 1.0, 7)
    loss = np.array([2.0, 1.5, np.nan, np.inf, -np.inf, 1e-300, 3.0])
    store.write("lines", {"step": 5, "direction": "sgd", "s": torch.from_numpy(s), "loss": loss.tolist(),
                          "best_step": 0.5, "best_loss": 1.5, "reduction": 0.5})
    store.write("histograms", {"step": 5, "direction": "sgd", "edges": np.arange(4.0), "counts": [1, 2, 3],
                               "sparsity": 0.25, "zeros": 7})
    run = load_run(store.path)
    line = run.rows("lines")[0]
    assert isinstance(line["s"], np.ndarray) and line["s"].dtype == np.float64
    np.testing.assert_array_equal(line["s"], s)  # bit-exact: JSON keeps repr precision
    np.testing.assert_array_equal(line["loss"], loss)
    hist = run.rows("histograms")[0]
    assert hist["counts"].dtype == np.int64 and hist["counts"].tolist() == [1, 2, 3]
    cols = run.columns("lines")
    assert cols["s"].dtype == object and isinstance(cols["s"][0], np.ndarray)


def test_json_columns_and_meta(store):
    store.set_meta("model", {"class": "MLP", "n_params": np.int64(10), "shape": (2, 3), "lr": np.float32(0.5)})
    store.write("smoothness", {"step": 1, "l_hat": 2.0, "grad_norm": 1.0, "step_norm": 0.1,
                               "per_gamma": {"1/6": 1.0, "5/6": math.nan}})
    run = load_run(store.path)
    assert run.meta["model"] == {"class": "MLP", "n_params": 10, "shape": [2, 3], "lr": 0.5}
    assert run.meta["recipes"] == ["sgd", "adam"]
    assert run.settings == json.loads(json.dumps(SETTINGS))
    assert "created" in run.meta
    per_gamma = run.rows("smoothness")[0]["per_gamma"]
    assert per_gamma["1/6"] == 1.0 and math.isnan(per_gamma["5/6"])


def test_insert_or_replace_by_primary_key(store):
    store.write("sharpness", sharp_row(0, "sgd", sharpness=1.0))
    store.write("sharpness", sharp_row(0, "sgd", sharpness=2.0))
    rows = load_run(store.path).rows("sharpness")
    assert len(rows) == 1 and rows[0]["sharpness"] == 2.0


def test_events_autoincrement_and_wall(store):
    store.log_event(3, "skip", "non-finite loss")
    store.log_event(None, "note", "hello")
    events = load_run(store.path).events()
    assert [e["kind"] for e in events] == ["skip", "note"]
    assert events[0]["id"] < events[1]["id"] and events[1]["step"] is None
    assert 0 <= events[0]["wall"] <= events[1]["wall"] < 60


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "row", "match"),
    [
        ("sharpnes", {"step": 0}, r"unknown table 'sharpnes'; known tables: meta, steps, sharpness"),
        ("sharpness", sharp_row(0, "sgd", sharpnes=1.0), r"table 'sharpness': unknown column\(s\) 'sharpnes'"),
        ("sharpness", {"step": 0, "direction": "sgd"}, r"missing column\(s\) 'sharpness', 'raw'"),
        ("sharpness", sharp_row(0, None), r"column 'direction': None given but the column is not nullable"),
        ("sharpness", sharp_row(0, "sgd", raw=None), r"column 'raw': None given.*float\('nan'\)"),
        ("sharpness", sharp_row(0, "sgd", raw="1.0"), r"column 'raw': expected REAL, got str"),
        ("sharpness", sharp_row(0.5, "sgd"), r"column 'step': expected INTEGER, got float 0.5"),
        ("sharpness", sharp_row(0, "sgd", shifted=2), r"column 'shifted': expected BOOL"),
        ("sharpness", sharp_row(0, 7), r"column 'direction': expected TEXT, got int"),
        ("lines", {"step": 0, "direction": "a", "s": ["x"], "loss": [1.0], "best_step": 0.0, "best_loss": 0.0,
                   "reduction": 0.0}, r"column 's': expected ARRAY"),
        ("smoothness", {"step": 0, "l_hat": 1.0, "grad_norm": 1.0, "step_norm": 1.0, "per_gamma": object()},
         r"column 'per_gamma': expected JSON"),
    ],
)
def test_writes_are_validated(store, table, row, match):
    with pytest.raises(SchemaError, match=match):
        store.write(table, [row])


def test_a_bad_row_writes_nothing(store):
    with pytest.raises(SchemaError, match="row 1"):
        store.write("sharpness", [sharp_row(0, "sgd"), {"step": 1, "direction": "sgd"}])
    assert load_run(store.path).rows("sharpness") == []


def test_transaction_is_atomic_and_rolls_back(store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.write("sharpness", sharp_row(0, "sgd"))
            store.write("steps", {"step": 0, "loss": 1.0, "grad_norm": 1.0, "lr": 0.1, "status": "ok", "wall": 0.0})
            raise RuntimeError("crash in the middle of a measurement")
    run = load_run(store.path)
    assert not run.has("sharpness") and not run.has("steps")
    with store.transaction():
        store.write("sharpness", sharp_row(0, "sgd"))
        assert not run.has("sharpness")  # not visible to readers before the commit
    assert run.has("sharpness")


def test_reader_validates_names(store):
    run = load_run(store.path)
    with pytest.raises(SchemaError, match="unknown table"):
        run.rows("nope")
    with pytest.raises(SchemaError, match="has no column 'stp'"):
        run.rows("sharpness", stp=0)
    with pytest.raises(SchemaError, match="no step column"):
        run.steps("meta")


def test_closed_store_refuses_writes(tmp_path):
    s = RunStore(tmp_path / "r", settings={})
    s.close()
    s.close()  # idempotent
    with pytest.raises(st.StoreError, match="closed"):
        s.write("sharpness", sharp_row(0, "sgd"))


# -- resume and settings ---------------------------------------------------------------------------


def test_resume_appends_and_keeps_creation_time(tmp_path):
    path = tmp_path / "run"
    with RunStore(path, settings=SETTINGS, meta={"recipes": ["sgd", "adam"], "mode": "eval"}) as s:
        s.write("sharpness", [sharp_row(0, "sgd"), sharp_row(10, "sgd", sharpness=9.0)])
    created = load_run(path).meta["created"]
    time.sleep(0.01)
    # settings equal up to JSON normalisation (tuple vs list) count as equal
    with RunStore(path, settings={**SETTINGS, "recipes": ("sgd", "adam")}, meta={"created": "later", "mode": "train"}) as s:
        s.write("sharpness", [sharp_row(10, "sgd", sharpness=1.0), sharp_row(20, "sgd")])  # step 10 redone
        assert s.elapsed() > 0
    run = load_run(path)
    assert run.steps() == [0, 10, 20]
    assert run.rows("sharpness", step=10)[0]["sharpness"] == 1.0
    assert run.meta["created"] == created and run.meta["mode"] == "train"
    assert [e["kind"] for e in run.events()] == ["resume"]


def test_mismatched_settings_are_refused_naming_each_key(tmp_path):
    path = tmp_path / "run"
    RunStore(path, settings=SETTINGS).close()
    new = {**SETTINGS, "delta": 0.001, "line": {"points": 9}, "extra": True}
    with pytest.raises(RunMismatchError) as info:
        RunStore(path, settings=new)
    msg = str(info.value)
    assert "delta: 0.01 (stored) != 0.001 (new)" in msg
    assert "line.points: 5 (stored) != 9 (new)" in msg
    assert "extra: <absent> (stored) != True (new)" in msg
    assert "every" not in msg and "new --out folder" in msg
    assert load_run(path).settings == json.loads(json.dumps(SETTINGS))  # untouched


def test_opening_an_old_run_adds_new_tables_and_columns(tmp_path):
    path = tmp_path / "run"
    with RunStore(path, settings={}) as s:
        s.write("robust", {"step": 0, "top_eig": 2.0, "l_robust": 1.0, "ratio": 2.0, "eps": 0.1, "n_removed": 1,
                           "n_samples": 4})
    with sqlite3.connect(path / st.DB_NAME) as conn:  # make it look like a run from an older version
        conn.execute("DROP TABLE cosine")
        conn.execute("ALTER TABLE robust DROP COLUMN n_samples")
    conn.close()
    run = load_run(path)
    assert run.rows("cosine") == [] and not run.has("cosine") and run.steps("cosine") == []
    assert run.rows("robust")[0]["n_samples"] is None  # declared, missing in the old table
    RunStore(path, settings={}).close()  # reopening for writing migrates
    names = {r["name"] for r in run.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "cosine" in names
    assert "n_samples" in {r["name"] for r in run.query("PRAGMA table_info(robust)")}


# -- reading ---------------------------------------------------------------------------------------


def test_load_run_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a landscape run: .*nowhere does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotARunError, match=r"empty has no run\.sqlite"):
        load_run(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "run.sqlite").write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(NotARunError, match="junk"):
        load_run(tmp_path / "junk")


def test_run_accessors(store):
    store.set_meta("trained_direction", "adam (trained)")
    store.write("sharpness", [sharp_row(20, "adam"), sharp_row(0, "sgd"), sharp_row(0, "zeta"),
                              sharp_row(0, "adam (trained)"), sharp_row(20, "sgd", ratio_to_sgd=1.0)])
    run = load_run(store.path / st.DB_NAME)  # the database file works too
    assert run.path == store.path
    assert run.steps() == [0, 20] and run.steps("lines") == []
    assert run.directions == ["sgd", "adam", "adam (trained)", "zeta"]
    assert run.trained_direction == "adam (trained)"
    assert [r["direction"] for r in run.rows("sharpness", step=0)] == ["adam (trained)", "sgd", "zeta"]
    assert run.has("sharpness") and not run.has("lines")
    df = run.df("sharpness")
    assert list(df.columns) == TABLES["sharpness"].column_names and len(df) == 5
    assert df["ratio_to_sgd"].isna().sum() == 4
    assert "Run(" in repr(run) and "RunStore(" in repr(store)


def test_df_without_pandas_says_how_to_install(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install"):
        load_run(store.path).df("sharpness")


def test_read_while_writing_in_process(store):
    run = load_run(store.path)  # opened before anything is written
    for step in range(3):
        store.write("sharpness", sharp_row(step, "sgd"))
        assert run.steps() == list(range(step + 1))  # each read sees every commit so far


def test_snapshot_reads_as_of_one_instant(store):
    run = load_run(store.path)
    store.write("sharpness", sharp_row(0, "sgd"))
    with run.snapshot():
        store.write("sharpness", sharp_row(1, "sgd"))  # the writer is not blocked ...
        assert run.steps() == [0] and len(run.rows("sharpness")) == 1  # ... and the snapshot does not move
        with run.snapshot():
            assert run.steps() == [0]
    assert run.steps() == [0, 1]


# -- crash safety (real processes) -----------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import importlib.util, sys
    # Load landscape/store.py on its own (stdlib + numpy) so the writer starts in a fraction of a second.
    spec = importlib.util.spec_from_file_location("landscape_store", sys.argv[1])
    store = importlib.util.module_from_spec(spec)
    sys.modules["landscape_store"] = store
    spec.loader.exec_module(store)
    with store.RunStore(sys.argv[2], settings={"k": 1}, meta={"recipes": ["sgd", "adam"]}) as s:
        step = 0
        while True:
            with s.transaction():  # one measurement = one commit
                s.write("sharpness", [
                    {"step": step, "direction": d, "sharpness": step + i / 4, "raw": step + i / 4, "shifted": False,
                     "grad_correlation": 0.5, "update_norm": 1.0, "loss": 1.0}
                    for i, d in enumerate(["sgd", "adam"])
                ])
                s.write("lines", {"step": step, "direction": "sgd", "s": [0.0, 1.0, 2.0],
                                  "loss": [1.0, 0.5, float(step)], "best_step": 1.0, "best_loss": 0.5,
                                  "reduction": 0.5})
            print(step, flush=True)
            step += 1
    """
)


def _check_consistent(run, committed: list[int]) -> None:
    with run.snapshot():  # the writer may commit between two reads: read as of one instant
        _check_snapshot(run, committed)


def _check_snapshot(run, committed: list[int]) -> None:
    steps = run.steps()
    assert set(committed) <= set(steps)
    assert steps == list(range(len(steps)))  # no hole
    for r in run.rows("sharpness"):
        assert r["sharpness"] == r["step"] + (0.25 if r["direction"] == "adam" else 0.0)
    lines = run.rows("lines")
    assert [r["step"] for r in lines] == steps  # both tables of a step, or neither
    for r in lines:
        np.testing.assert_array_equal(r["loss"], [1.0, 0.5, r["step"]])


def test_sigkilled_writer_leaves_every_committed_row_readable(tmp_path):
    path = tmp_path / "run"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ROOT / "landscape" / "store.py"), str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    committed: list[int] = []
    read_while_writing = False
    try:
        deadline = time.monotonic() + 60
        while len(committed) < 40:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer exited early: {proc.stderr.read()}")
            committed.append(int(line))
            if len(committed) == 10:  # another process reads while the writer keeps committing
                _check_consistent(load_run(path), committed)
                read_while_writing = True
            assert time.monotonic() < deadline, "writer too slow"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and read_while_writing
    run = load_run(path)
    _check_consistent(run, committed)
    assert run.meta["recipes"] == ["sgd", "adam"]
    # the killed run can be resumed: appends after the last committed step
    last = run.steps()[-1]
    with RunStore(path, settings={"k": 1}) as s:
        s.write("sharpness", sharp_row(last + 1, "sgd"))
    assert load_run(path).steps()[-1] == last + 1


# -- one writer per run folder ---------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("store", sys.argv[4])  # the store alone: no torch import
    store_module = sys.modules["store"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(store_module)
    RunStore, RunLockedError = store_module.RunStore, store_module.RunLockedError
    folder, go, hold = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    print("ready", flush=True)
    while not go.exists():  # start together (a creation race)
        time.sleep(0.001)
    try:
        store = RunStore(folder, settings={"every": 10}, meta={"recipes": ["sgd"]})
    except RunLockedError as e:
        print("locked", e, flush=True)
        sys.exit(3)
    print("writer", flush=True)
    store.write("events", {"step": None, "kind": "note", "message": "hello", "wall": 0.0})
    time.sleep(hold)
    store.close()
""")


def _holders(tmp_path, n, hold):
    folder, go = tmp_path / "run", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(go), str(hold),
                               str(ROOT / "landscape" / "store.py")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    return folder, go, procs


def test_second_writer_in_another_process_is_refused_naming_the_holder(tmp_path):
    folder, go, (proc,) = _holders(tmp_path, 1, hold=120)
    assert proc.stdout.readline().strip() == "ready"
    go.touch()
    try:
        assert proc.stdout.readline().strip() == "writer"
        with pytest.raises(st.RunLockedError, match=rf"already being written by pid {proc.pid} on .*since"):
            RunStore(folder, settings={"every": 10})
        assert load_run(folder).meta["recipes"] == ["sgd"]  # readers are not affected
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a killed holder releases the lock: the run can be resumed at once
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    with RunStore(folder, settings={"every": 10}) as s:
        s.log_event(None, "note", "resumed")
    assert [e["message"] for e in load_run(folder).events()][-1] == "resumed"
    assert (folder / st.LOCK_NAME).read_text() == ""  # no stale holder details after a clean close


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    with RunStore(tmp_path / "run", settings={"every": 10}):
        with pytest.raises(st.RunLockedError, match="in this same process.*close"):
            RunStore(tmp_path / "run", settings={"every": 10})
    with RunStore(tmp_path / "run", settings={"every": 10}):  # free again once closed
        pass


def test_creation_race_has_one_writer_and_a_whole_store(tmp_path):
    folder, go, procs = _holders(tmp_path, 4, hold=5)
    for p in procs:  # every process has imported and waits: they start the creation together
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        outs.append((p.returncode, out, err))
    codes = sorted(code for code, _, _ in outs)
    assert codes == [0, 3, 3, 3], outs
    for code, out, err in outs:
        if code == 3:
            assert out.startswith("locked run folder") and "already being written by pid" in out, out
        assert "NotARunError" not in err and "Traceback" not in err, err
    run = load_run(folder)
    assert run.settings == {"every": 10} and run.meta["recipes"] == ["sgd"]
    assert sum(e["message"] == "hello" for e in run.events()) == codes.count(0)


def test_a_store_whose_creator_died_before_its_first_commit_is_created_afresh(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    sqlite3.connect(str(folder / st.DB_NAME)).close()  # an empty database file, no tables
    with RunStore(folder, settings={"every": 10}):
        pass
    assert load_run(folder).settings == {"every": 10}
