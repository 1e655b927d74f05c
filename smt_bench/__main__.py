"""`python -m smt_bench [overrides]`: the Hydra app. Bad input exits 2 with one line on stderr."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .errors import EXIT_BAD_INPUT, UserError

CONF = Path(__file__).resolve().parents[1] / "conf"


def _fail(msg: str):
    print(f"smt-bench: error: {msg}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def check_group_choices(argv: list[str], conf: Path = CONF) -> None:
    """Hydra reports an unknown group option with a multi-line dump and exit 1; name it in one line."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra.")):
            continue
        key, value = arg.split("=", 1)
        group = conf / key
        if not group.is_dir() or "." in key:
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        for v in value.split(","):
            if v and v not in choices:
                hint = " (or set budget.fraction=F for any fraction)" if key == "budget" else ""
                _fail(f"unknown {key} {v!r}; choose one of: {', '.join(choices)}{hint}")


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    from .run import execute

    try:
        execute(cfg)
    except UserError as e:
        _fail(str(e))


def main() -> None:
    check_group_choices(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
