"""Test environment: offline, no wandb account, Triton kernels interpreted on CPU.

Set before anything imports transformers, wandb or triton (kernels read TRITON_INTERPRET when
they are defined).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` on 2 cores: one torch thread per worker, none waits on another
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# --- shared fixtures -------------------------------------------------------------------------
import copy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# `-m "not slow"` is the fast lane (docs/running.md); slow tests carry @pytest.mark.slow, and every test of
# these files is a process launch (they import no pytest to mark it with)
SLOW_FILES = ("test_adding_a_method.py", "test_gpu_check.py", "test_smt_study.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a running SLURM cluster (sinfo and sacct answer; bash "
                                       "scripts/slurm_local.sh up starts one on this machine); run only with "
                                       "-m slurm, one at a time (docs/slurm.md#testing-on-a-real-cluster)")


def pytest_collection_modifyitems(config, items):
    # the real-cluster tests take about 9 minutes and time SLURM's signals: only when asked for (-m slurm), so the
    # suite's command stays the same with or without a cluster up
    asked = "slurm" in (config.getoption("markexpr") or "")
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        if "slurm" in item.keywords and not asked:
            item.add_marker(pytest.mark.skip(reason="a real SLURM cluster test: run with -m slurm "
                                                    "(docs/slurm.md#testing-on-a-real-cluster)"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The converted SmolLM2 directory (tiny-llama borrows its tokenizer); converts once (~20 s) if missing."""
    from smt_bench.models import SmolLM2GGUF

    path = SmolLM2GGUF().path()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    return path


@pytest.fixture(scope="session")
def _tiny_llama_pristine(smollm2_path):
    from smt_bench.models import TinyLlama

    return TinyLlama().load()


@pytest.fixture
def tiny_llama(_tiny_llama_pristine):
    """A fresh (model, tokenizer) pair: random-init tiny-llama (fp32, seed 0) and SmolLM2's tokenizer."""
    model, tok = _tiny_llama_pristine
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def tokenizer(_tiny_llama_pristine):
    return _tiny_llama_pristine[1]


@pytest.fixture(scope="session")
def compose():
    """compose(*overrides, hydra=False) -> the DictConfig `python -m smt_bench <overrides>` would get."""
    from smt_bench.__main__ import compose_config

    return lambda *overrides, hydra=False: compose_config(list(overrides), hydra=hydra)


@pytest.fixture
def cli(tmp_path):
    """cli(*args, timeout=...) runs `python -m smt_bench args` in a scratch working directory (Hydra
    writes outputs/ there, not into the repo); the environment, offline settings included, is inherited."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    def _run(*args, timeout=300):
        return subprocess.run([sys.executable, "-m", "smt_bench", *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return _run


@pytest.fixture(scope="session")
def only_progress_bars():
    """only_progress_bars(stderr): a clean run writes nothing on stderr but tqdm bars (no warnings, no log
    lines); fails naming the first pieces that are something else."""
    import re

    bar = re.compile(r"^.*\d+%\|.*\| *\d+/\d+ \[.*\]$")

    def check(stderr: str) -> bool:
        pieces = [p.strip() for p in re.split(r"[\r\n]+", stderr) if p.strip()]
        bad = [p for p in pieces if not bar.match(p)]
        assert not bad, bad[:5]
        return True

    return check
