"""Bad, damaged and hostile input: one line and exit 2, never a traceback, never a hang, never
altered weights used silently. Real files: FIFOs, symlinks to devices and loops, flipped bytes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from landscape.checkpoints import CheckpointError, describe_checkpoint, load_checkpoint
from landscape.cli import app
from landscape.store import load_run
from tests.specs import tiny_lm
from tests.test_analyze import one_line_error

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpts")
    tiny_lm.train(folder, steps=2, formats=("pt",))
    return folder


def _variant(ckpts: Path, dest: Path, change, name: str = "ckpt_000.pt") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    obj = torch.load(ckpts / "ckpt_000.pt", weights_only=True)
    change(obj)
    torch.save(obj, dest / name)
    return dest / name


def _analyze(paths, tmp_path, spec="tests.specs.tiny_lm:build"):
    return runner.invoke(app, ["analyze", "--spec", spec, *map(str, paths), "--out", str(tmp_path / "run"), "-r", "sgd"])


def _flip_member(path: Path, member_suffix: str, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of a stored zip member's data (its CRC no longer matches)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if i.filename.endswith(member_suffix)), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - n // 2
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _mkfifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


HOSTILE = {
    "step at 2^63": (lambda ck, t: [_variant(ck, t / "s", lambda o: o.update(step=2**63))],
                     ["step 9223372036854775808 is out of range"]),
    "negative step": (lambda ck, t: [_variant(ck, t / "n", lambda o: o.update(step=-3))], ["step -3 is out of range"]),
    "meta tensor": (lambda ck, t: [_variant(ck, t / "m", lambda o: o["model"].update(
        {"pos.weight": torch.empty(o["model"]["pos.weight"].shape, device="meta")}))],
        ["does not hold plain dense weights", "'pos.weight' is on the meta device"]),
    "sparse tensor": (lambda ck, t: [_variant(ck, t / "sp", lambda o: o["model"].update(
        {"pos.weight": o["model"]["pos.weight"].to_sparse()}))], ["'pos.weight' is a torch.sparse_coo tensor"]),
    "int64 weights": (lambda ck, t: [_variant(ck, t / "i", lambda o: o["model"].update(
        {"pos.weight": o["model"]["pos.weight"].long()}))],
        ["'pos.weight' is torch.int64 in the checkpoint but torch.float32 in the model"]),
    "symlink to /dev/zero": (lambda ck, t: [_link(t / "zero.pt", "/dev/zero")], ["zero.pt is a character device"]),
    "fifo": (lambda ck, t: [_mkfifo(t / "pipe.pt")], ["pipe.pt is a FIFO, not a regular file"]),
    "symlink loop": (lambda ck, t: [_loop(t)], ["loop_1.pt is a symbolic link loop"]),
    "crc": (lambda ck, t: [_crc_broken(ck, t)], ["fails its CRC check", "its weights were not used"]),
}


def _link(path: Path, target: str) -> Path:
    os.symlink(target, path)
    return path


def _loop(tmp: Path) -> str:
    os.symlink(tmp / "loop_1.pt", tmp / "loop_1.pt")
    return str(tmp / "loop_*.pt")


def _crc_broken(ckpts: Path, tmp: Path) -> Path:
    path = tmp / "ckpt_000.pt"
    shutil.copy(ckpts / "ckpt_000.pt", path)
    _flip_member(path, "/data/0")  # the first tensor's bytes: the file still loads with torch.load alone
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_checkpoints_are_refused_in_one_line(tmp_path, ckpts, case):
    make, fragments = HOSTILE[case]
    one_line_error(_analyze(make(ckpts, tmp_path), tmp_path), *fragments)
    assert not (tmp_path / "run" / "run.sqlite").exists()  # nothing was created for a refused input


def test_a_crc_failure_is_what_torch_alone_would_not_see(tmp_path, ckpts):
    path = _crc_broken(ckpts, tmp_path)
    altered = torch.load(path, weights_only=True)["model"]
    original = torch.load(ckpts / "ckpt_000.pt", weights_only=True)["model"]
    assert any(not torch.equal(altered[k], original[k]) for k in original)  # torch loads altered weights
    with pytest.raises(CheckpointError, match="CRC"):
        load_checkpoint(path)


def _hf_folder(tmp: Path, index: dict | None = None, config: str | None = None) -> Path:
    from safetensors.torch import save_file

    folder = tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(config if config is not None else json.dumps({"model_type": "tiny"}))
    model = tiny_lm.make_model()
    if index is None:
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    else:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("shard", ["../../x.safetensors", "/etc/passwd", "sub/../../y.safetensors"])
def test_a_shard_index_may_only_name_files_in_its_folder(tmp_path, shard):
    pytest.importorskip("safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"")
    folder = _hf_folder(tmp_path, index={"weight_map": {"tok.weight": shard}})
    with pytest.raises(CheckpointError, match="lies outside the checkpoint folder"):
        describe_checkpoint(folder)


def test_a_broken_config_json_is_refused(tmp_path):
    pytest.importorskip("safetensors")
    folder = _hf_folder(tmp_path, config="{not json")
    one_line_error(_analyze([folder], tmp_path), "config.json: not a valid config.json")


def test_non_utf8_folder_names_are_read(tmp_path, ckpts):
    weird = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    weird.mkdir()
    for f in ckpts.glob("*.pt"):
        shutil.copy(f, weird / f.name)
    out = Path(os.fsdecode(bytes(tmp_path) + b"/run-\xff"))
    result = runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(weird), "--out", str(out),
                                 "-r", "sgd"])
    assert result.exit_code == 0, result.output
    assert load_run(out).steps() == [0, 1, 2]
    result = runner.invoke(app, ["report", str(out), "--format", "csv"])
    assert result.exit_code == 0 and result.output.count("\n") == 1 + 2 + 2 + 1  # the last has no real step


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


def test_the_pickle_refusal_prints_only_its_line(tmp_path, ckpts):
    """Protocol 4 makes torch's weights-only unpickler warn: only our one line reaches stderr."""
    path = tmp_path / "bad_1.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "payload": _System()}, f, protocol=4)
    exe = shutil.which("landscape") or pytest.skip("the landscape console script is not installed")
    res = subprocess.run([exe, "analyze", "--spec", "tests.specs.tiny_lm:build", str(path), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert "refused to load" in res.stderr and "posix.system" in res.stderr or "os.system" in res.stderr


# -- run stores that are damaged -------------------------------------------------------------------


def _damaged(synthetic_path: Path, sql: str, params=()) -> Path:
    with sqlite3.connect(synthetic_path / "run.sqlite") as c:
        c.execute(sql, params)
    return synthetic_path


DAMAGE = {
    "malformed meta JSON": ("UPDATE meta SET value = '{not json' WHERE key = 'model'", ()),
    "settings not JSON": ("UPDATE meta SET value = 'nan nan' WHERE key = 'settings'", ()),
    "recipes of the wrong type": ("UPDATE meta SET value = '42' WHERE key = 'recipes'", ()),
    "text in a REAL column": ("UPDATE sharpness SET sharpness = 'abc' WHERE direction = 'adam'", ()),
    "malformed array": ("UPDATE lines SET s = '[1, 2' WHERE direction = 'sgd'", ()),
    "text step": ("UPDATE sharpness SET step = 'x' WHERE direction = 'lion' AND step = 0", ()),
}


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.parametrize("command", ["report", "plot"])
def test_a_damaged_run_store_is_one_line_not_a_traceback(tmp_path, case, command):
    from tests._synthetic import write_synthetic_run

    run = _damaged(write_synthetic_run(tmp_path / "r", measured=(0, 50)), *DAMAGE[case])
    result = runner.invoke(app, [command, str(run), *(["-o", str(tmp_path / "figs")] if command == "plot" else [])])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"landscape {command}: error: ") and "damaged" in lines[0], lines


# -- write failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["report", "plot", "analyze", "demo"])
def test_write_failures_are_one_line(tmp_path, ckpts, command):
    from tests._synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "r", measured=(0,))
    target = tmp_path / "full.txt"
    # /dev/full: every write fails with ENOSPC, as on a full disk; a path under a file cannot be created
    args = {
        "report": ["report", str(run), "-o", "/dev/full"],
        "plot": ["plot", str(run), "-o", str(target / "figs")],
        "analyze": ["analyze", "--spec", "tests.specs.tiny_lm:build", str(ckpts), "--out", str(target / "run"),
                    "-r", "sgd"],
        "demo": ["demo", "--steps", "1", "--out", str(target / "demo")],
    }[command]
    target.write_text("a file, not a folder")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"landscape {command}: error: cannot write"), lines


@pytest.mark.parametrize("command", [["demo", "--steps", "1"], ["analyze", "--spec", "tests.specs.tiny_lm:build", "x.pt"],
                                     ["plot", "RUN"]])
def test_an_empty_out_is_refused(tmp_path, command, monkeypatch):
    from tests._synthetic import write_synthetic_run

    monkeypatch.chdir(tmp_path)
    run = write_synthetic_run(tmp_path / "r", measured=(0,))
    args = [str(run) if a == "RUN" else a for a in command] + ["--out", ""]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--out must name a path, got an empty string" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing written into the current folder


def test_a_mismatched_spec_leaves_no_run_folder_behind(tmp_path, ckpts):
    out = tmp_path / "run"
    bad = runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build_wider", str(ckpts), "--out", str(out),
                              "-r", "sgd"])
    one_line_error(bad, "does not fit the model")
    assert not out.exists()
    good = runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(ckpts), "--out", str(out), "-r", "sgd"])
    assert good.exit_code == 0, good.output  # the corrected command is not refused
    assert load_run(out).steps() == [0, 1, 2]


def test_metadata_strings_cannot_escape_the_report(tmp_path):
    from landscape.report import report
    from landscape.store import RunStore
    from tests._synthetic import write_synthetic_run

    evil = "Evil\n\\immediate\\write18{touch /tmp/pwned}\n% and a | pipe"
    path = write_synthetic_run(tmp_path / "r", measured=(0,), recipes=("sgd", "adam"), trained=evil)
    with RunStore(path, settings=load_run(path).settings) as store:
        store.set_meta("model", {"class": evil, "n_params": 10})
    run = load_run(path)
    tex = report(run, "latex")
    for line in tex.splitlines():
        assert not line.lstrip().startswith("\\immediate"), line
        body = line.split("%", 1)[0] if not line.startswith("%") else ""
        assert "\\write18" not in body.replace("\\textbackslash{}write18", ""), line
    assert "\\textbackslash{}immediate\\textbackslash{}write18\\{touch /tmp/pwned\\}" in tex
    md = report(run, "md")
    lines = [line for line in md.splitlines() if "Evil" in line or "pwned" in line]
    assert lines and all("Evil" in line and "pwned" in line for line in lines)  # the name stays on one line
    assert any(line.startswith("| adam (trained)") or line.startswith("| Evil") for line in lines)


def test_a_second_analyze_on_the_same_folder_is_refused_while_the_first_writes(tmp_path, ckpts):
    from landscape.store import RunStore

    out = tmp_path / "run"
    args = ["analyze", "--spec", "tests.specs.tiny_lm:build", str(ckpts), "--out", str(out), "-r", "sgd"]
    assert runner.invoke(app, args).exit_code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from landscape.store import RunStore, load_run; "
         "s = RunStore(sys.argv[1], settings=load_run(sys.argv[1]).settings); print('ready', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "ready"
        one_line_error(runner.invoke(app, args), "is already being written by pid", str(holder.pid))
        new = tmp_path / "new"  # a folder held by another writer is refused before any work, settings or not
        with RunStore(new, settings={"x": 1}):
            one_line_error(runner.invoke(app, [*args[:-4], "--out", str(new), "-r", "sgd"]), "already being written")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
