"""`python tests/fault_run.py [--fault KIND:STEP[:SEED]]... [--dump-block-maps DIR] -- <smt_bench overrides>`:
the real CLI, with faults injected at exact training steps, so tests can kill, signal or break a run where
they choose. Runs under torchrun as well (`torchrun ... tests/fault_run.py ...`): a fault fires on every rank.
`--dump-block-maps DIR` writes each rank's SMT block map to DIR/rank<R>.json (rank 0's is the result's;
the others' are otherwise never written).

KIND: kill (SIGKILL to this process: nothing runs after it), term (SIGTERM: the run checkpoints and
stops), raise (a RuntimeError in training), oom (torch.OutOfMemoryError), nan (the loss turns NaN: a divergence),
hold (the run pauses, alive, until the file named by $FAULT_RELEASE exists; it writes $FAULT_RELEASE.held when it
pauses, so a test knows it is there). A fault fires at
the end of step STEP (when the trainer logs it, before that step's checkpoint) of the job whose
config has seed SEED (any job if left out). Only the test process is patched; smt-bench has no
fault hooks of its own.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def install(faults: list[tuple[str, int, int | None]]) -> None:
    import smt_bench.loggers as loggers
    import smt_bench.trainer as trainer

    if any(kind == "timeout" for kind, _, _ in faults):  # submitit's SIGUSR2 handler once the timeouts are used up
        from submitit.core.utils import UncompletedJobError

        def not_requeued(signum, frame):
            raise UncompletedJobError("Job not requeued because: timed-out too many times.")

        signal.signal(signal.SIGUSR2, not_requeued)
    current = {"seed": None}
    start, log, forward = loggers.NullLogger.start, loggers.NullLogger.log, trainer.forward_loss
    broken = {"nan": False}

    def started(self, run_id, config):
        current["seed"] = config.get("seed")
        broken["nan"] = False
        return start(self, run_id, config)

    def logged(self, metrics, step):
        log(self, metrics, step)
        if "train/loss" not in metrics:
            return
        for kind, at, seed in faults:
            if step == at and seed in (None, current["seed"]):
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif kind == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                elif kind == "timeout":  # the time limit's signal; the handler above refuses to requeue
                    os.kill(os.getpid(), signal.SIGUSR2)
                elif kind == "raise":
                    raise RuntimeError(f"injected fault at step {step}")
                elif kind == "oom":
                    import torch

                    raise torch.OutOfMemoryError(f"injected out of memory at step {step}")
                elif kind == "nan":
                    broken["nan"] = True
                elif kind == "hold":
                    import time

                    release = Path(os.environ["FAULT_RELEASE"])
                    Path(f"{release}.held").write_text(str(os.getpid()))
                    deadline = time.monotonic() + 600
                    while not release.exists() and time.monotonic() < deadline:
                        time.sleep(0.1)

    def loss(model, batch):
        out = forward(model, batch)
        return out * float("nan") if broken["nan"] else out

    loggers.NullLogger.start, loggers.NullLogger.log, trainer.forward_loss = started, logged, loss


def dump_block_maps(directory: str) -> None:
    import json

    from smt_bench.methods.smt.tuned import SMTTuned

    make = SMTTuned._make_report

    def report(self):
        out = make(self)
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(out["block_map"]))
        return out

    SMTTuned._make_report = report


def main(argv: list[str]) -> None:
    split = argv.index("--")
    faults = []
    for i, a in enumerate(argv[:split]):
        if a == "--fault":
            kind, step, *seed = argv[i + 1].split(":")
            faults.append((kind, int(step), int(seed[0]) if seed else None))
        if a == "--dump-block-maps":
            dump_block_maps(argv[i + 1])
    install(faults)
    from smt_bench.__main__ import main as smt_main

    sys.argv = ["smt_bench", *argv[split + 1:]]
    smt_main()


if __name__ == "__main__":
    main(sys.argv[1:])
