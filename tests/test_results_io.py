"""Many jobs of a sweep write result files into one folder at once (a SLURM array shares results.dir):
write_json_atomic never lets a reader see half a file, and leaves no temp file behind."""
import json
import multiprocessing as mp
from pathlib import Path

from smt_bench.results import finished, write_json_atomic

WRITERS, FILES, SHARED = 8, 150, 4


def _write_many(writer: int, folder: str, barrier, bad):
    """Each writer: FILES files of its own, and every third write to one of SHARED paths all writers use;
    after each shared write it reads a shared file back, while the others may be replacing it."""
    folder = Path(folder)
    barrier.wait()  # all writers begin together
    for i in range(FILES):
        own = {"run_info": {"status": "finished", "id": f"w{writer}-{i}"}, "filler": "x" * (4096 * (1 + i % 16))}
        write_json_atomic(folder / f"w{writer}-{i}.json", own)
        if i % 3 == 0:
            shared = folder / f"shared-{i % SHARED}.json"
            write_json_atomic(shared, {**own, "run_info": {"status": "finished", "id": f"shared-by-w{writer}"}})
            try:
                text = (folder / f"shared-{(i + writer) % SHARED}.json").read_text()
            except FileNotFoundError:  # not written yet by anyone: fine, a file is there whole or not at all
                continue
            try:
                json.loads(text)
            except ValueError:
                with bad.get_lock():
                    bad.value += 1


def test_eight_processes_writing_results_at_once_leave_only_whole_files(tmp_path):
    ctx = mp.get_context("spawn")  # fresh interpreters, as separate jobs are (no state shared by fork)
    barrier, bad = ctx.Barrier(WRITERS), ctx.Value("i", 0)
    procs = [ctx.Process(target=_write_many, args=(w, str(tmp_path), barrier, bad)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    assert bad.value == 0  # no reader saw a partly written shared file

    files = sorted(tmp_path.iterdir())
    names = {f.name for f in files}
    assert names == {f"w{w}-{i}.json" for w in range(WRITERS) for i in range(FILES)} | {
        f"shared-{k}.json" for k in range(SHARED)}  # every file, and no temp file (.<name>.*.tmp) left
    for f in files:
        r = json.loads(f.read_text())  # every file parses as a whole
        assert finished(f) and len(r["filler"]) % 4096 == 0
        if f.name.startswith("w"):
            assert r["run_info"]["id"] == f.stem
        else:
            assert r["run_info"]["id"] in {f"shared-by-w{w}" for w in range(WRITERS)}


def _probe_many(folder: str, n: int) -> int:
    from smt_bench.errors import UserError
    from smt_bench.results import probe_writable

    failures = 0
    for _ in range(n):
        try:
            probe_writable(Path(folder))
        except UserError:
            failures += 1
    return failures


def test_tasks_probing_the_same_new_folder_at_once_do_not_fail_each_other(tmp_path):
    """The tasks of a job array start together and probe <results.dir>/runs/<group>/ before it exists: each
    may make, use and remove it under the others; none may fail (it did: `cannot write ... (File exists)`)."""
    import multiprocessing as mp

    folder = tmp_path / "results" / "runs" / "group"
    with mp.get_context("fork").Pool(6) as pool:
        failures = pool.starmap(_probe_many, [(str(folder), 150)] * 6)
    assert failures == [0] * 6
    assert [p for p in (tmp_path / "results").rglob("*") if not p.is_dir()] == []  # no probe file left
