"""Metric loggers: none by default; wandb optional and offline-safe."""
from __future__ import annotations

import os


class NullLogger:
    def start(self, run_id: str, config: dict) -> None:
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


class WandbLogger(NullLogger):
    """wandb raises without an account; default to offline unless WANDB_MODE or `mode` says otherwise."""

    def __init__(self, project: str = "smt-bench", mode: str | None = None):
        self.project, self.mode, self.run = project, mode, None

    def start(self, run_id: str, config: dict) -> None:
        import wandb

        mode = self.mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=self.project, name=run_id, id=run_id, config=config, mode=mode,
                              reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self, summary: dict) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.run.finish()
            self.run = None
