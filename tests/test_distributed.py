"""torchrun with 2 CPU processes (gloo): DDP for LoRA, SMT and CorDA, FSDP2 for full FT, gradient all-reduce for
LISA, SpIEL and HFT.

The contract: 2 ranks × batch 4 train the run that 1 process trains with batch 4 × grad_accum 2 (the
same 8 sequences per step, each micro-batch's loss a mean over its own tokens). With DDP the curves are
bitwise equal: DDP averages the two ranks' gradients as (g0 + g1) / 2 and one process accumulates
g0 / 2 + g1 / 2, and halving is exact in floating point. FSDP2 reduce-scatters flat shards and computes
the clipping norm from per-shard sums, in another order: equal within 1e-5 (measured: 5e-7 on losses of
≈ 10.9). LoRA's dropout draws its masks per rank, so that comparison runs at dropout 0. The 2-rank LoRA
and full FT runs are stopped (kill -9, SIGTERM) and resumed on the way, so the same comparisons show that
a resumed multi-rank run is the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smt_bench.analysis.settings import global_batch
from smt_bench.checkpoint import Checkpoint, CheckpointDir, rng_state, set_rng_state
from smt_bench.data.batches import BatchStream
from test_resume import _same_run, _weights

REPO = Path(__file__).resolve().parents[1]
BASE = ["model=tiny-llama", "device=cpu", "eval.enabled=false", "train.max_steps=8", "train.batch_size=4",
        "train.max_len=96", "train.eval_every=4", "budget.fraction=0.001", "results.export=true"]
FSDP_TOLERANCE = 1e-5


def _launch(cwd: Path, args: list[str], ranks: int = 1, driver: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m smt_bench` in one process, or the same under `torchrun --nproc_per_node ranks`; with a
    driver, through tests/fault_run.py (faults, block-map dumps)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    flags, args = [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]  # Hydra's flags first
    prog = [str(REPO / "tests" / "fault_run.py"), *driver, "--"] if driver is not None else ["-m", "smt_bench"]
    prog += flags
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *prog, *args]
    else:
        cmd = [sys.executable, *prog, *args]
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _results(results: Path) -> dict[str, tuple[Path, dict]]:
    out = {}
    for p in sorted(results.glob("runs/*/*.json")):
        res = json.loads(p.read_text())
        assert res["config"]["method"]["name"] not in out, f"two result files for {res['summary']['method']}"
        out[res["config"]["method"]["name"]] = (p, res)
    return out


def test_the_ranks_batches_of_a_step_are_the_batches_one_process_accumulates():
    exs = [{"input_ids": [i, i], "labels": [i, i]} for i in range(11)]
    one = BatchStream(exs, 3, pad_id=0, seed=5)
    ranks = [BatchStream(exs, 3, pad_id=0, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for step in range(7):  # across epoch boundaries (3 batches per epoch of 11)
        single = [next(one)["input_ids"][:, 0].tolist() for _ in range(2)]  # grad_accum 2
        assert [next(r)["input_ids"][:, 0].tolist() for r in ranks] == single, step
    state = ranks[1].state_dict()
    again = BatchStream(exs, 3, pad_id=0, seed=0, rank=1, world_size=2)
    again.load_state_dict(state)
    assert next(again)["input_ids"].equal(next(ranks[1])["input_ids"])


def test_a_checkpoint_keeps_every_ranks_rng_state(tmp_path):
    states = []
    for r in range(3):
        torch.manual_seed(100 + r)
        states.append(rng_state(torch.device("cpu")))
    ckpt = Checkpoint(step=3, tuned={"w": torch.ones(2)}, tuned_meta={}, optimizer={"state": {}, "param_groups": []},
                      scheduler={}, stream={"generator": torch.Generator().get_state(), "epoch": 0, "pos": 0},
                      rng=states[0], rank_rng=states[1:])
    CheckpointDir(tmp_path / "c").save(ckpt)
    loaded = CheckpointDir(tmp_path / "c").load()
    for r, st in enumerate([loaded.rng, *loaded.rank_rng]):
        set_rng_state(st, torch.device("cpu"))
        expected = torch.Generator().manual_seed(100 + r).get_state()
        assert torch.get_rng_state().equal(expected), r


def test_fsdp2_optimizer_state_keyed_by_parameter_name_round_trips(tmp_path):
    sd = {"state": {"model.layers.0.mlp.up_proj.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
          "param_groups": [{"lr": 1e-3, "params": ["model.layers.0.mlp.up_proj.weight"]}]}
    ckpt = Checkpoint(step=1, tuned={}, tuned_meta={}, optimizer=sd, scheduler={},
                      stream={"generator": torch.Generator().get_state(), "epoch": 0, "pos": 0},
                      rng=rng_state(torch.device("cpu")))
    CheckpointDir(tmp_path / "c").save(ckpt)
    back = CheckpointDir(tmp_path / "c").load().optimizer
    assert list(back["state"]) == list(sd["state"]) and back["param_groups"] == sd["param_groups"]
    assert back["state"]["model.layers.0.mlp.up_proj.weight"]["exp_avg"].equal(torch.ones(2, 2))


def test_settings_hold_the_global_batch_not_how_it_is_split():
    def flat(bs, ga, ws=None):
        f = {"train.batch_size": json.dumps(bs), "train.grad_accum": json.dumps(ga), "model.name": '"m"'}
        return {**f, **({"distributed.world_size": json.dumps(ws)} if ws else {})}

    assert global_batch(flat(4, 2)) == global_batch(flat(4, 1, 2))  # 1 process × 2 micro-batches = 2 ranks
    assert global_batch(flat(4, 1, 2))["train.global_batch"] == "8"
    assert global_batch(flat(4, 1, 4)) != global_batch(flat(4, 1, 2))  # another global batch: another setting
    assert global_batch(flat(8, 1)) != global_batch(flat(4, 1, 2))  # another micro-batch (the loss's token mean)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The same runs from 1 process (grad_accum 2) and from 2 ranks (grad_accum 1). Two of the 2-rank runs are
    stopped and resumed on the way: SIGTERM at step 6 to FSDP2 full FT (it checkpoints and stops `preempted`),
    kill -9 at step 6 to DDP LoRA (its last checkpoint is step 4); the same command then resumes them."""
    root = tmp_path_factory.mktemp("dist")
    one, two, maps = root / "one", root / "two", root / "maps"
    ckpt = ["train.checkpoint_every=4"]
    runs = [(["-m", "method=full_ft,smt"], "term:6"), (["method=lora", "method.args.lora_dropout=0"], "kill:6"),
            (["method=lisa", "budget.fraction=0.0115", "method.switch_every=3"], None),  # resume: test_peers
            (["-m", "method=spiel,hft,corda"], None)]  # the newer peers at their defaults (resume: their own tests)
    stopped, resumed = {}, []
    for args, fault in runs:
        p = _launch(root / "cwd", [*BASE, *args, "train.grad_accum=2", f"results.dir={one}"])
        assert p.returncode == 0, f"{args}, 1 process: {p.stderr[-3000:]}"
        if fault:
            p = _launch(root / "cwd", [*BASE, *args, *ckpt, f"results.dir={two}"], ranks=2, driver=["--fault", fault])
            assert p.returncode != 0  # the first job was stopped
            stopped.update({m: r["run_info"] for m, (_, r) in _results(two).items() if m not in stopped})
        p = _launch(root / "cwd", [*BASE, *args, *ckpt, f"results.dir={two}"], ranks=2,
                    driver=["--dump-block-maps", str(maps)])
        assert p.returncode == 0, f"{args}, 2 ranks: {p.stderr[-3000:]}"
        resumed.append(p.stdout)
    return _results(one), _results(two), maps, stopped, "".join(resumed)


@pytest.mark.slow
def test_a_stopped_2_rank_run_resumes_where_its_checkpoint_left_off(compared):
    _, two, _, stopped, out = compared
    assert stopped["full_ft"]["status"] == "preempted" and stopped["full_ft"]["checkpoint_step"] == 6
    assert stopped["lora"]["status"] == "running" and stopped["lora"]["checkpoint_step"] == 4  # kill -9: heartbeat
    for method, step in (("full_ft", 6), ("lora", 4)):
        path, res = two[method]
        assert f"resuming {path.name} from its checkpoint at step {step}" in out
        assert res["train_info"]["resumed_from_step"] == step and not path.with_suffix(".ckpt").exists()
    assert two["smt"][1]["train_info"]["resumed_from_step"] is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "smt"])
def test_ddp_on_2_ranks_is_bitwise_the_run_of_1_process_with_the_same_global_batch(compared, method):
    """LoRA's 2-rank run was killed and resumed on the way: bitwise all the same."""
    one, two, *_ = compared
    (pa, a), (pb, b) = one[method], two[method]
    assert b["train_info"]["distributed"] == {"world_size": 2, "backend": "gloo", "strategy": "ddp",
                                              "per_rank_batch": 4, "grad_accum": 1, "global_batch": 8}
    assert a["train_info"]["global_batch"] == b["train_info"]["global_batch"] == 8
    assert a["train_info"]["tokens"] == b["train_info"]["tokens"]  # the same sequences
    _same_run(a, b, _weights(pa), _weights(pb))
    assert pa.name != pb.name  # the world size is part of the run's identity


@pytest.mark.slow
def test_lisa_on_2_ranks_is_bitwise_the_run_of_1_process(compared):
    """All-reduce of the layers active at each step (DDP cannot follow a changing trainable set)."""
    one, two, *_ = compared
    (pa, a), (pb, b) = one["lisa"], two["lisa"]
    assert b["train_info"]["distributed"]["strategy"] == "allreduce"
    draws = a["method_info"]["active_layers"]
    assert [d["from_step"] for d in draws] == [1, 4, 7] and draws == b["method_info"]["active_layers"]
    _same_run(a, b, _weights(pa), _weights(pb))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spiel", "hft"])
def test_a_changing_trainable_set_on_2_ranks_is_bitwise_the_run_of_1_process(compared, method):
    """SpIEL reselects its entries (steps 3 and 8: a gradient window, drop and regrow from rank-reduced
    statistics), HFT trains its drawn half: both all-reduce the gradients of what trains at each step."""
    one, two, *_ = compared
    (pa, a), (pb, b) = one[method], two[method]
    assert b["train_info"]["distributed"]["strategy"] == "allreduce"
    if method == "spiel":
        assert [r["step"] for r in a["method_info"]["reselections"]] == [3, 8]
        assert a["method_info"]["reselections"] == b["method_info"]["reselections"]
    else:
        assert a["method_info"]["draws"] == b["method_info"]["draws"]
    _same_run(a, b, _weights(pa), _weights(pb))


@pytest.mark.slow
def test_corda_calibrates_on_2_ranks_as_1_process_to_summation_order(compared):
    """The covariance is summed over ranks (another order than one process's: not bitwise), and every rank
    takes rank 0's decomposition, so the ranks train one model."""
    one, two, *_ = compared
    (pa, a), (pb, b) = one["corda"], two["corda"]
    assert b["train_info"]["distributed"]["strategy"] == "ddp"
    la, lb = a["train_info"]["loss_curve"], b["train_info"]["loss_curve"]
    assert len(la) == len(lb) == 8 and max(abs(x - y) for x, y in zip(la, lb)) <= 1e-4
    wa, wb = _weights(pa), _weights(pb)
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4


@pytest.mark.slow
def test_fsdp2_full_ft_on_2_ranks_matches_1_process_within_tolerance(compared):
    """Its 2-rank run was preempted (SIGTERM) at step 6 and resumed."""
    one, two, *_ = compared
    (pa, a), (pb, b) = one["full_ft"], two["full_ft"]
    assert b["train_info"]["distributed"]["strategy"] == "fsdp2"
    la, lb = a["train_info"]["loss_curve"], b["train_info"]["loss_curve"]
    assert len(la) == len(lb) == 8 and max(abs(x - y) for x, y in zip(la, lb)) <= FSDP_TOLERANCE
    va, vb = a["train_info"]["val_loss_curve"], b["train_info"]["val_loss_curve"]
    assert [s for s, _ in va] == [s for s, _ in vb] and max(abs(x - y) for (_, x), (_, y) in zip(va, vb)) <= FSDP_TOLERANCE
    wa, wb = _weights(pa), _weights(pb)  # rank 0 gathered the whole model for the export
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= FSDP_TOLERANCE


@pytest.mark.slow
def test_both_smt_ranks_select_the_blocks_one_process_selects(compared):
    one, two, maps, *_ = compared
    rank0, rank1 = (json.loads((maps / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 == two["smt"][1]["method_info"]["block_map"] == one["smt"][1]["method_info"]["block_map"]
    assert len(rank0) == sum(two["smt"][1]["method_info"]["selected_blocks"].values()) > 0


@pytest.mark.slow
def test_rank_0_alone_writes_one_result_per_run_and_no_checkpoint_is_left(compared):
    _, two, *_ = compared
    folder = next(iter(two.values()))[0].parent
    names = sorted(p.name for p in folder.iterdir())
    assert len([n for n in names if n.endswith(".json")]) == 7  # full_ft, smt, lora, lisa, spiel, hft, corda
    assert not [n for n in names if n.startswith(".") or n.endswith(".ckpt")], names
