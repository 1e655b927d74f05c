"""Sparse Matrix Tuning: see method.py; the layer, scoring, selection and optimizer live beside it.

`SMT` is imported on first use (PEP 562), so `smt_bench.methods.smt.analysis`, which the analysis CLI
loads, does not pull in torch; `smt_bench.methods.smt.SMT` (Hydra's _target_) resolves as before.
"""
__all__ = ["SMT"]


def __getattr__(name: str):
    if name == "SMT":
        from .method import SMT

        globals()["SMT"] = SMT
        return SMT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
