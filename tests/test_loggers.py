"""logger=wandb: a real wandb run in offline mode (no account, no network) records the sweep's group, the
run's name and tags and its config under the run's own id; a second start of the same run (a requeued job
resuming from its checkpoint) is the same wandb run."""
import json
import struct
from pathlib import Path

import pytest
import wandb
from hydra.utils import instantiate
from omegaconf import OmegaConf

from smt_bench import provenance
from smt_bench.loggers import run_name, run_tags, sweep_group

SMT = ["logger=wandb", "method=smt", "budget.fraction=0.01", "seed=0"]  # the default model: smollm2-135m


def wandb_records(path: Path):
    """The records of a .wandb file: wandb's LevelDB-style log (7-byte file header, 32 KiB blocks of
    checksum/length/type-framed chunks) of protobuf `Record`s, as `wandb sync` reads it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", data[:7]
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunks)
            yield record
            chunks = b""


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """wandb as on a cluster node without WANDB_MODE: every file it writes under tmp_path; a base URL nothing
    listens on, so a network call would fail rather than reach anywhere. wandb reads these once per process
    (its setup singleton) and writes its run files asynchronously: teardown() waits for them and resets it."""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb; here the default applies
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    (tmp_path / "wandb-home").mkdir()
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    wandb.teardown()  # an earlier wandb use in this process (test_app.py) left its settings in the singleton
    yield tmp_path / "wandb-home" / "wandb"
    wandb.teardown()


def _config(compose, tmp_path, *extra):
    cfg = compose(*SMT, f"results.dir={tmp_path / 'sweep1'}", *extra)
    return cfg, OmegaConf.to_container(cfg, resolve=True)


def test_name_group_and_tags_come_from_the_run_config(compose, tmp_path):
    _, config = _config(compose, tmp_path)
    assert run_name("id", config) == "smt-b0.01-smollm2-135m-s0"
    assert sweep_group(config) == f"{tmp_path / 'sweep1'}/smollm2-135m-bundled"
    assert run_tags(config) == ["method:smt", "model:smollm2-135m", "data:bundled", "budget:0.01"]
    # a rerun of the same sweep (same results.dir and group) is the same group, whatever else it changes
    _, again = _config(compose, tmp_path, "seed=1", "method=lora")
    assert sweep_group(again) == sweep_group(config) and run_name("id", again) == "lora-b0.01-smollm2-135m-s1"
    assert sweep_group({**config, "results": {"dir": "/" + "d" * 200, "group": "g"}}).endswith("d/g")
    assert len(sweep_group({**config, "results": {"dir": "/" + "d" * 200, "group": "g"}})) == 128
    assert run_name("abc123", {"seed": 0}) == "s0" and run_name("abc123", {}) == "abc123"  # partial configs
    _, tagged = _config(compose, tmp_path, "results.tag=qkv")  # a tag names the wandb run as it names the file
    assert run_name("id", tagged) == "smt-qkv-b0.01-smollm2-135m-s0"


def test_offline_wandb_run_records_group_name_tags_and_config(compose, tmp_path, offline_wandb):
    cfg, config = _config(compose, tmp_path, "logger.tags=[paper-sweep]")
    run_id = provenance.config_hash(config)
    logger = instantiate(cfg.logger, _convert_="all")  # as run.py builds it

    logger.start(run_id, config)
    run = logger.run
    assert (run.id, run.name, run.project) == (run_id, "smt-b0.01-smollm2-135m-s0", "smt-bench")
    assert run.group == f"{tmp_path / 'sweep1'}/smollm2-135m-bundled"
    assert list(run.tags) == ["method:smt", "model:smollm2-135m", "data:bundled", "budget:0.01", "paper-sweep"]
    assert run.offline and run.config["method"]["name"] == "smt" and run.config["seed"] == 0
    logger.log({"train/loss": 2.5}, 1)
    logger.finish({"mean_accuracy": 41.7, "skip": None})
    assert logger.run is None

    # the requeued job starts the same run again (resumed from its checkpoint): the same wandb id
    logger.start(run_id, config)
    logger.log({"train/loss": 2.0}, 2)
    logger.finish({"mean_accuracy": 42.5})
    wandb.teardown()  # the run files are complete once wandb's service has finished

    runs = sorted(offline_wandb.glob("offline-run-*"))
    assert len(runs) == 2 and all((r / f"run-{run_id}.wandb").is_file() for r in runs)
    assert not (tmp_path / "wandb").exists() and not Path("wandb").exists()  # all under WANDB_DIR
    for run_dir in runs:
        records = list(wandb_records(run_dir / f"run-{run_id}.wandb"))
        (rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (rec.run_id, rec.display_name, rec.project) == (run_id, "smt-b0.01-smollm2-135m-s0", "smt-bench")
        assert rec.run_group == f"{tmp_path / 'sweep1'}/smollm2-135m-bundled"
        assert list(rec.tags) == ["method:smt", "model:smollm2-135m", "data:bundled", "budget:0.01", "paper-sweep"]
        logged = {i.key: json.loads(i.value_json) for i in rec.config.update}
        assert {k: logged[k] for k in config} == config  # the whole resolved config
        assert any(r.WhichOneof("record_type") == "history" for r in records)


def test_group_and_entity_can_be_set(compose, tmp_path, offline_wandb):
    cfg, config = _config(compose, tmp_path, "logger.group=ablation-3", "logger.entity=my-lab",
                          "logger.project=smt-test")
    logger = instantiate(cfg.logger, _convert_="all")
    logger.start(provenance.config_hash(config), config)
    assert (logger.run.group, logger.run.entity, logger.run.project) == ("ablation-3", "my-lab", "smt-test")
    logger.finish({})
