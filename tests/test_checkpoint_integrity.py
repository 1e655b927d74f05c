"""Checkpoints that cannot be trusted are never resumed: each records the size and sha256 of its files; a
truncated, altered or half-written one is found on load, named in one line, and the previous one that verifies
is used, or the run stops with one line saying how to start over (results.resume=false). A write that fails
(ENOSPC, EIO) leaves the previous checkpoint, and the previous result file, as they were. Faults are injected.
"""
from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import smt_bench.checkpoint as checkpoint
import smt_bench.results as results
from smt_bench.checkpoint import FILES, MANIFEST, Checkpoint, CheckpointDir, rng_state
from smt_bench.errors import UserError
from smt_bench.results import write_json_atomic


def _ckpt(step: int) -> Checkpoint:
    """A checkpoint whose every tensor and number depends on its step (so two steps never compare equal)."""
    g = torch.Generator().manual_seed(step)
    opt_state = {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(64, 64, generator=g)}}
    return Checkpoint(step=step, tuned={"w": torch.randn(64, 64, generator=g), "b": torch.full((8,), float(step))},
                      tuned_meta={"method": "test", "step": step},
                      optimizer={"state": opt_state, "param_groups": [{"lr": 1e-3 * step, "params": [0]}]},
                      scheduler={"last_epoch": step}, stream={"generator": g.get_state(), "epoch": 0, "pos": step},
                      rng=rng_state(torch.device("cpu")), progress={"losses": [0.5] * step})


def _same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.step == b.step and a.tuned_meta == b.tuned_meta and a.progress == b.progress
    assert a.tuned.keys() == b.tuned.keys() and all(a.tuned[k].equal(b.tuned[k]) for k in a.tuned)
    sa, sb = a.optimizer["state"][0], b.optimizer["state"][0]
    assert sa["exp_avg"].equal(sb["exp_avg"]) and sa["step"].equal(sb["step"])
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"] and a.scheduler == b.scheduler
    assert a.stream["generator"].equal(b.stream["generator"]) and a.stream["pos"] == b.stream["pos"]
    assert a.rng["torch"].equal(b.rng["torch"])


def _two(tmp_path) -> tuple[Path, dict[int, Checkpoint]]:
    """Checkpoints at steps 3 and 6 (both kept: the newest and its fallback)."""
    d = tmp_path / "run.ckpt"
    saved = {s: _ckpt(s) for s in (3, 6)}
    for s in saved.values():
        CheckpointDir(d).save(s)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000003", "step-00000006"]
    return d, saved


def _err_lines(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_checkpoint_records_the_size_and_sha256_of_each_file(tmp_path):
    d = tmp_path / "run.ckpt"
    final = CheckpointDir(d).save(_ckpt(3))
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["format"] == checkpoint.FORMAT and set(manifest["files"]) == set(FILES)
    for name, entry in manifest["files"].items():
        data = (final / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert [p.name for p in d.iterdir()] == ["step-00000003"]  # no temporary folder left


def test_the_newest_and_one_previous_checkpoint_are_kept(tmp_path):
    d = tmp_path / "run.ckpt"
    for s in (3, 6, 9):
        CheckpointDir(d).save(_ckpt(s))
    assert sorted(p.name for p in d.iterdir()) == ["step-00000006", "step-00000009"]
    CheckpointDir(d, keep=1).save(_ckpt(12))
    assert [p.name for p in d.iterdir()] == ["step-00000012"]


def test_a_truncated_tensor_file_falls_back_to_the_previous_checkpoint_with_one_line(tmp_path, capsys):
    d, saved = _two(tmp_path)
    f = d / "step-00000006" / "tuned.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # the disk filled up, or a copy stopped half-way
    capsys.readouterr()
    loaded = CheckpointDir(d).load()
    _same(loaded, saved[3])
    (line,) = _err_lines(capsys)
    assert str(d / "step-00000006") in line and "tuned.safetensors has" in line and "its manifest says" in line
    assert line.endswith("resuming from the previous one, step-00000003")


def test_a_flipped_byte_of_the_same_size_is_caught_by_its_checksum(tmp_path, capsys):
    d, saved = _two(tmp_path)
    f = d / "step-00000006" / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside exp_avg's data: the file still parses, with a wrong value
    f.write_bytes(bytes(data))
    alone = load_file(str(f))  # what loading without the manifest would have resumed from, silently
    assert not alone["0.exp_avg"].equal(saved[6].optimizer["state"][0]["exp_avg"])
    capsys.readouterr()
    _same(CheckpointDir(d).load(), saved[3])
    (line,) = _err_lines(capsys)
    assert "optimizer.safetensors does not match its sha256 checksum" in line and "step-00000006" in line


@pytest.mark.parametrize("damage, problem", [
    ("delete", "manifest.json is missing"),
    ("truncate", "manifest.json is not valid JSON"),
    ("drop-entry", "manifest.json is malformed"),
    ("delete-state", "state.json is missing"),
])
def test_a_missing_or_invalid_manifest_is_damage(tmp_path, capsys, damage, problem):
    d, saved = _two(tmp_path)
    m = d / "step-00000006" / MANIFEST
    if damage == "delete":
        m.unlink()
    elif damage == "truncate":
        m.write_text(m.read_text()[:40])
    elif damage == "drop-entry":
        manifest = json.loads(m.read_text())
        del manifest["files"]["rng.safetensors"]
        m.write_text(json.dumps(manifest))
    else:
        (d / "step-00000006" / "state.json").unlink()
    capsys.readouterr()
    _same(CheckpointDir(d).load(), saved[3])
    (line,) = _err_lines(capsys)
    assert problem in line and "step-00000006" in line


def test_when_no_checkpoint_verifies_the_run_stops_with_one_line_naming_it_and_how_to_start_over(tmp_path, capsys):
    d, _ = _two(tmp_path)
    for s in ("step-00000003", "step-00000006"):
        (d / s / "rng.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as e:
        CheckpointDir(d).load()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"the checkpoint at {d / 'step-00000006'} is damaged (rng.safetensors has 0 bytes")
    assert "; the earlier one is damaged too; " in msg and "rerun with results.resume=false to start over" in msg
    assert capsys.readouterr().err == ""  # nothing else said: the caller prints the one line
    assert sorted(p.name for p in d.iterdir()) == ["step-00000003", "step-00000006"]  # load deletes nothing


def test_a_single_damaged_checkpoint_has_no_fallback(tmp_path):
    d = tmp_path / "run.ckpt"
    CheckpointDir(d).save(_ckpt(4))
    (d / "step-00000004" / "state.json").write_text("{")
    with pytest.raises(UserError, match=r"\(state\.json has \d+ bytes, its manifest says \d+\); there is no earlier "
                                        r"checkpoint to fall back to; rerun with results\.resume=false"):
        CheckpointDir(d).load()


def test_after_a_fallback_the_damaged_checkpoint_is_not_kept_as_the_next_fallback(tmp_path, capsys):
    d, saved = _two(tmp_path)
    (d / "step-00000006" / "tuned.safetensors").write_bytes(b"junk")
    ckpts = CheckpointDir(d)
    _same(ckpts.load(), saved[3])
    assert ckpts.latest_step() == 3
    ckpts.save(_ckpt(5))  # the resumed run saves at another step (a signal): 6 belongs to the abandoned run
    assert sorted(p.name for p in d.iterdir()) == ["step-00000003", "step-00000005"]
    capsys.readouterr()
    _same(CheckpointDir(d).load(), _ckpt(5))
    assert _err_lines(capsys) == []


def _fail_save_file(n_ok: int, exc):
    """save_file that writes n_ok files, then half of the next one, then raises exc."""
    real, calls = checkpoint.save_file, []

    def fake(tensors, path):
        calls.append(path)
        real(tensors, path)
        if len(calls) > n_ok:
            p = Path(path)
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
            raise exc
    return fake


ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["tuned", "rng", "rust", "manifest", "rename"])
def test_a_failed_save_leaves_the_previous_checkpoints_as_they_were(tmp_path, monkeypatch, where):
    d, saved = _two(tmp_path)
    before = _snapshot(d)
    if where == "tuned":
        monkeypatch.setattr(checkpoint, "save_file", _fail_save_file(0, ENOSPC))
    elif where == "rng":
        monkeypatch.setattr(checkpoint, "save_file", _fail_save_file(2, ENOSPC))
    elif where == "rust":  # how safetensors itself reports a full disk
        monkeypatch.setattr(checkpoint, "save_file", _fail_save_file(1, SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")))
    elif where == "manifest":
        real = checkpoint._write_bytes

        def write(path, data):
            if path.name == MANIFEST:
                path.write_bytes(data[:10])
                raise ENOSPC
            real(path, data)
        monkeypatch.setattr(checkpoint, "_write_bytes", write)
    else:
        def rename(src, dst):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(OSError) as e:
        CheckpointDir(d).save(_ckpt(9))
    monkeypatch.undo()
    code = errno.EIO if where == "rename" else errno.ENOSPC
    assert e.value.errno == code
    assert str(e.value) == (f"[Errno {code}] {'Input/output error' if code == errno.EIO else 'No space left on device'}"
                            f" while saving checkpoint step 9 into {d}; the checkpoint at step 6 is kept")
    # the fallback (step 3) was removed to make room before the write; step 6 is byte for byte what it was
    assert [p.name for p in d.iterdir()] == ["step-00000006"]  # no temporary folder left
    assert _snapshot(d) == {k: v for k, v in before.items() if k.startswith("step-00000006")}
    _same(CheckpointDir(d).load(), saved[6])


def test_the_same_step_saved_again_replaces_it_and_a_failure_keeps_the_first(tmp_path, monkeypatch):
    d, saved = _two(tmp_path)
    again = _ckpt(6)
    again.progress = {"losses": [0.25]}
    monkeypatch.setattr(checkpoint, "save_file", _fail_save_file(1, ENOSPC))
    with pytest.raises(OSError, match="checkpoint step 6"):
        CheckpointDir(d).save(again)
    monkeypatch.undo()
    _same(CheckpointDir(d).load(), saved[6])
    CheckpointDir(d).save(again)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000003", "step-00000006"]
    _same(CheckpointDir(d).load(), again)


def _old_format(folder: Path) -> None:
    """What smt-bench-checkpoint/1 wrote: no manifest."""
    (folder / MANIFEST).unlink()
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "format": "smt-bench-checkpoint/1"}))


def test_an_old_format_checkpoint_without_a_manifest_loads_unverified_and_says_so(tmp_path, capsys):
    d, saved = _two(tmp_path)
    _old_format(d / "step-00000006")
    capsys.readouterr()
    _same(CheckpointDir(d).load(), saved[6])
    (line,) = _err_lines(capsys)
    assert "step-00000006 has no checksums" in line and "loading it unverified" in line
    # unverified, but one that cannot even be read is still damage, not a traceback
    f = d / "step-00000006" / "tuned.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    _same(CheckpointDir(d).load(), saved[3])
    (line,) = _err_lines(capsys)
    assert "step-00000006 is damaged (it cannot be read: SafetensorError" in line


def test_an_unknown_format_is_refused(tmp_path):
    d = tmp_path / "run.ckpt"
    folder = CheckpointDir(d).save(_ckpt(2))
    _old_format(folder)
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "format": "smt-bench-checkpoint/99"}))
    with pytest.raises(UserError, match="state.json has format 'smt-bench-checkpoint/99'; this smt-bench reads "
                                        "smt-bench-checkpoint/2, smt-bench-checkpoint/1"):
        CheckpointDir(d).load()


@pytest.mark.parametrize("where", ["write", "replace"])
def test_a_result_file_write_that_fails_leaves_the_previous_file(tmp_path, monkeypatch, where):
    path = tmp_path / "runs" / "g" / "run.json"
    write_json_atomic(path, {"run_info": {"status": "running", "checkpoint_step": 6}, "filler": "x" * 10000})
    before = path.read_bytes()
    if where == "write":  # the disk fills up half-way through the JSON
        real = results.json.dump

        def dump(obj, f, **kw):
            f.write(json.dumps(obj, **kw)[:5000])
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(results.json, "dump", dump)
        assert real is not dump
    else:
        def replace(src, dst):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(results.os, "replace", replace)
    with pytest.raises(OSError) as e:
        write_json_atomic(path, {"run_info": {"status": "finished"}, "filler": "y" * 10000})
    monkeypatch.undo()
    assert e.value.errno == (errno.ENOSPC if where == "write" else errno.EIO)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no temporary file left


@pytest.mark.slow  # a tiny-llama run in this process: about 5 s on 2 idle cores
def test_a_run_whose_checkpoint_save_hits_a_full_disk_ends_failed_saying_so_and_keeps_the_previous_one(
        compose, tmp_path, monkeypatch, smollm2_path):
    """End to end (tiny-llama, 5 steps, checkpoints at 2 and 4): the save at step 4 finds the disk full the way
    safetensors reports it; the result file reads `failed` with the reason, and step 2's checkpoint resumes."""
    from smt_bench.results import checkpoint_dir
    from smt_bench.run import RunFailed, execute

    cfg = compose("model=tiny-llama", "device=cpu", "method=lora", "budget.fraction=0.001", "eval.enabled=false",
                  "train.max_steps=5", "train.checkpoint_every=2", "train.batch_size=2", "train.max_len=64",
                  "train.eval_every=0", "train.val_batches=1", "results.export=false", f"results.dir={tmp_path}")
    monkeypatch.setattr(checkpoint, "save_file", _fail_save_file(3, SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")))
    with pytest.raises(RunFailed) as e:
        execute(cfg)
    (path,) = tmp_path.glob("runs/*/*.json")
    ckpt = checkpoint_dir(path)
    info = json.loads(path.read_text())["run_info"]
    expected = (f"OSError: [Errno 28] No space left on device while saving checkpoint step 4 into {ckpt}; "
                f"the checkpoint at step 2 is kept")
    assert (info["status"], info["error"], info["checkpoint_step"], str(e.value)) == ("failed", expected, 2, expected)
    assert [p.name for p in ckpt.iterdir()] == ["step-00000002"]
    monkeypatch.undo()
    assert CheckpointDir(ckpt).load().step == 2


@pytest.mark.slow  # a tiny-llama run in this process
def test_a_finished_run_whose_result_cannot_be_written_keeps_its_checkpoints_and_says_so(
        compose, tmp_path, monkeypatch, capsys, smollm2_path):
    """The disk fills before the final write: the file keeps its last state (running, with its checkpoint), the
    run fails with one stderr line naming the file, and the checkpoints stay for the same command to resume."""
    from smt_bench import run
    from smt_bench.results import checkpoint_dir
    from smt_bench.run import RunFailed, execute

    cfg = compose("model=tiny-llama", "device=cpu", "method=lora", "budget.fraction=0.001", "eval.enabled=false",
                  "train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=2", "train.max_len=64",
                  "train.eval_every=0", "train.val_batches=1", "results.export=false", f"results.dir={tmp_path}")
    real = run.write_json_atomic

    def write(path, obj):
        if obj["run_info"]["status"] != "running":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(run, "write_json_atomic", write)
    with pytest.raises(RunFailed, match="the result could not be written"):
        execute(cfg)
    (path,) = tmp_path.glob("runs/*/*.json")
    info = json.loads(path.read_text())["run_info"]
    assert (info["status"], info["checkpoint_step"]) == ("running", 2)
    assert sorted(p.name for p in checkpoint_dir(path).iterdir()) == ["step-00000002"]
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("smt-bench:")]
    assert err == [f"smt-bench: error: cannot write {path} ([Errno 28] No space left on device); it still reads "
                   f"running and its checkpoints are kept: the same command resumes once it can write"]
