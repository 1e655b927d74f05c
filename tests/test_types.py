"""Type checking: mypy over smt_bench/ with the project's config (pyproject.toml [tool.mypy]) reports no
error, and the same config does catch a wrong annotation, a wrong argument to `trainer.train` and a
class that is not a `Logger` (so a passing check means something). Alone: `.venv/bin/mypy`."""
import re
import textwrap
from pathlib import Path

from mypy import api

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "pyproject.toml")


def mypy(*args: str) -> tuple[str, int]:
    """mypy's report and exit status; run from the repository root, where the config's paths (files,
    cache_dir) are relative to."""
    out, err, status = api.run(["--config-file", CONFIG, *args])
    return out + err, status


def test_mypy_passes_over_the_package(monkeypatch):
    monkeypatch.chdir(REPO)
    report, status = mypy()
    assert status == 0, f"mypy found errors (run .venv/bin/mypy to see them alone):\n{report}"
    checked = re.search(r"no issues found in (\d+) source files?", report)
    n_files = sum(1 for _ in (REPO / "smt_bench").rglob("*.py"))
    assert checked and int(checked.group(1)) == n_files, report  # the whole package, not a part of it


def test_the_check_catches_type_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "typing_control.py"
    bad.write_text(textwrap.dedent('''\
        from smt_bench.loggers import Logger, NullLogger
        from smt_bench.methods.base import Tuned
        from smt_bench.schema.groups import Train
        from smt_bench.trainer import train


        def count() -> int:
            return "three"


        class PrintLogger:  # no finish(), and log() takes no step
            def start(self, run_id: str, config: dict) -> None: ...

            def log(self, metrics: dict) -> None: ...


        def use(logger: Logger) -> None: ...


        use(NullLogger())  # fine: satisfies the protocol
        use(PrintLogger())


        def run(tuned: Tuned, cfg: Train) -> None:
            train(tuned, [{"input_ids": None}], [], cfg, None, NullLogger())  # a list is no BatchStream
            train(tuned, None, [], cfg, None, PrintLogger())
    '''))
    report, status = mypy(str(bad))  # smt_bench's modules come from the shared cache
    assert status == 1, report
    # by file name: where the module's text and smt_bench are unchanged, mypy replays the errors it cached
    # under the path of an earlier run's tmp_path
    errors = [line.split(":", 2)[1:] for line in report.splitlines()
              if line.split(":", 1)[0].endswith("/typing_control.py") and ": error: " in line]
    want = [  # (line, what the error names)
        ("8", 'Incompatible return value type (got "str", expected "int")'),
        ("21", 'Argument 1 to "use" has incompatible type "PrintLogger"; expected "Logger"'),
        ("25", 'Argument 2 to "train" has incompatible type "list[dict[str, None]]"; expected "BatchStream"'),
        ("26", 'Argument 2 to "train" has incompatible type "None"; expected "BatchStream"'),
        ("26", 'Argument 6 to "train" has incompatible type "PrintLogger"; expected "Logger"'),
    ]
    assert len(errors) == len(want), report
    assert all(line == n and what in msg for (line, msg), (n, what) in zip(errors, want)), report
