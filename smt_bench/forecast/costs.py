"""Each method's cost terms (model.Cost) on shapes and a plan: `method_cost` asks the method first
(`Method.cost`, smt_bench/methods/base.py: SMT has its own in smt_bench/methods/smt/cost.py), then the terms
below for the methods whose modules do not state theirs yet (peft tuners, LISA, S2FT), and else the generic
default: the trainable count, read as base weights that train, spread evenly over the layers (approximate: it
says so in the forecast's notes).
"""
from __future__ import annotations

from typing import Any, Callable

from .model import Arch, Cost, _full_inputs


def default_cost(method: Any, shapes: Any, plan: Any) -> Cost:
    """Generic terms from the trainable count alone: the trainable parameters are base weights (as full FT's, LISA's
    or HFT's), a fraction f = trainable / N of each layer's, so dW costs 2 FLOPs per trainable weight and token, and
    the trained linears' inputs are saved in proportion f. Exact for full FT (f = 1)."""
    arch = Arch.from_shapes(shapes)
    n = int(plan.achieved_params)
    f = min(1.0, n / max(arch.total_params, 1))
    exact = f >= 1.0
    return Cost(trainable=n, trained_linear=int(f * (arch.linear_params + arch.head_params)),
                trained_inputs=f * _full_inputs(arch), grad_from_embeddings=exact, head_trains=exact,
                notes=() if exact else (f"{getattr(method, 'name', type(method).__name__)}: generic terms (trainable "
                                        f"parameters read as {100 * f:.1f}% of every layer's weights)",))


def floor_cost(shapes: Any) -> Cost:
    """The benchmark's floor: every weight frozen, backward still run down to the embeddings."""
    return Cost(trainable=0, grad_from_embeddings=True)


# --- peft tuners (smt_bench/methods/peft_methods.py) ---------------------------------------------------------
def _targets(arch: Arch, names: list[str]) -> list[tuple[str, int, int]]:
    return [(s, o, i) for s, o, i in arch.layer_linear if s in set(names)]


# linears that read the same input within a layer: autograd saves that input once for all of them
GROUPS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def _group_inputs(arch: Arch, suffixes: set[str]) -> float:
    """Elements per token (one layer) of the distinct inputs of these linears."""
    total, done = 0.0, set()
    for s, _, i in arch.layer_linear:
        if s not in suffixes or s in done:
            continue
        group = next((g for g in GROUPS if s in g), {s})
        done |= group
        if s in ("o_proj",):  # its input is the attention output, saved by attention anyway
            continue
        total += i
    return total


def peft_cost(method: Any, shapes: Any, plan: Any) -> Cost:
    """LoRA and its LoraConfig relatives (rsLoRA, PiSSA, KaSA, CorDA; DoRA with use_dora): per target A (r×d_in) and
    B (d_out×r). What autograd saves per target and token: the dropout's output (the adapter's input) and its mask
    (fp32 on the CPU, whose dropout is input × a noise tensor; bool on CUDA), or with dropout 0 the target's input
    itself (one per group of linears reading it), and A's output. DoRA (peft 0.21, with dropout) also saves the base
    output it recomputes on the dropped-out input and the adapter output (d_out each), recomputes that base matmul
    (2 + 2 FLOPs per weight and token), and builds per target, in every forward, lora_weight through an identity
    of d_in × d_in (peft's FSDP-safe form: A·I, then B) and W + s·BA for the row norms: d_in² + 3·d_in·d_out fp32
    at once, the largest target's being the step's largest temporary. Other peft configs (SHiRA, MiSS,
    Super-Tuning) are counted as an adapter that saves its target's input (approximate)."""
    arch = Arch.from_shapes(shapes)
    n = int(plan.achieved_params)
    args = dict(getattr(method, "args", {}) or {})
    targets = _targets(arch, list(getattr(method, "target_modules", [])))
    L = arch.layers
    notes: list[str] = []
    if getattr(method, "peft_config", "LoraConfig") != "LoraConfig":
        notes.append(f"{method.name}: {method.peft_config} counted as an adapter saving its targets' inputs "
                     "(approximate)")
        return Cost(trainable=n, added=n, own_saved=L * _group_inputs(arch, {s for s, _, _ in targets}),
                    own_flops_per_token=6.0 * n,
                    optimizer="foreach", notes=tuple(notes))
    r = float(plan.detail.get("r", 0) or 0)
    dropout = float(args.get("lora_dropout", 0.0) or 0.0)
    dora = bool(args.get("use_dora", False))
    if dropout > 0:
        saved = float(L * sum(i for _, _, i in targets))
        masks = float(L * sum(i for _, _, i in targets))
    else:
        saved, masks = L * _group_inputs(arch, {s for s, _, _ in targets}), 0.0
    saved += L * len(targets) * r  # A's output, read by B's backward
    flops_tok = 6.0 * n  # forward and backward of A and B
    transient, flops_fwd, bytes_fwd = 0, 0.0, 0.0
    if dora:
        saved += L * sum(o for _, o, _ in targets) * 2  # the recomputed base output and the adapter's
        if dropout > 0:
            flops_tok += 4.0 * L * sum(o * i for _, o, i in targets)
        transient = max((4 * (i * i + 3 * o * i) for _, o, i in targets), default=0)
        flops_fwd = L * sum(2.0 * i * i * r + 2.0 * i * r * o + 3.0 * o * i for _, o, i in targets)
        bytes_fwd = L * sum(4.0 * (i * i + 6 * o * i) for _, o, i in targets)
    return Cost(trainable=n, added=n, own_saved=saved, own_masks=masks, own_flops_per_token=flops_tok,
                own_flops_per_forward=flops_fwd, own_bytes_per_forward=bytes_fwd, transient=transient,
                optimizer="foreach", notes=tuple(notes))


# --- LISA (smt_bench/methods/lisa.py) ---------------------------------------------------------------------
def lisa_cost(method: Any, shapes: Any, plan: Any) -> Cost:
    """γ whole layers train at a time (plus, with train_embeddings, every tensor outside the layers). Per draw: the
    γ layers' gradients and (optimizer_state=reset) their AdamW moments, freed when the draw changes; with `keep`
    the moments of every layer drawn so far stay, up to all layers' (counted here at their largest: every layer).
    The trained layers save their linears' and norms' inputs; the gradient flows from the lowest drawn layer, here
    counted from the first (the draw is random)."""
    arch = Arch.from_shapes(shapes)
    n = int(plan.achieved_params)
    gamma = int(plan.detail.get("layers", 1))
    per_layer = int(plan.detail.get("per_layer_params", arch.layer_params))
    emb = bool(getattr(method, "train_embeddings", False))
    keep = getattr(method, "optimizer_state", "reset") == "keep"
    state = n if not keep else per_layer * arch.layers + int(plan.detail.get("non_layer_params", 0))
    layer_lin = arch.linear_params // max(arch.layers, 1)
    return Cost(trainable=n, trained_linear=gamma * layer_lin + (arch.head_params if emb else 0),
                trained_inputs=gamma * _full_inputs(arch) / max(arch.layers, 1), state_params=state,
                grad_from_embeddings=emb, head_trains=emb,
                notes=("lisa: optimizer_state=keep counted with every layer's moments (its largest)",) if keep else ())


# --- S2FT (smt_bench/methods/s2ft.py) -----------------------------------------------------------------------
def s2ft_cost(method: Any, shapes: Any, plan: Any) -> Cost:
    """Selected heads of o_proj and channels of down_proj train as deltas D beside the frozen weight:
    y = x Wᵀ + x[:, S] Dᵀ. Per token it saves x[:, S] (a copy of the selected columns) and costs 6 FLOPs per
    trained parameter (forward, dX, dD)."""
    n = int(plan.achieved_params)
    hd = int(plan.detail.get("head_dim", 1) or 1)
    cols = int(plan.detail.get("heads", 0)) * hd + int(plan.detail.get("channels", 0))
    return Cost(trainable=n, added=n, own_saved=float(cols), own_flops_per_token=6.0 * n)


# the methods whose modules do not state their terms yet, by class name
BY_CLASS: dict[str, Callable[[Any, Any, Any], Cost]] = {
    "PeftTuner": peft_cost, "CordaTuner": peft_cost, "LISA": lisa_cost, "S2FT": s2ft_cost}


def method_cost(method: Any, shapes: Any, plan: Any) -> Cost:
    """The method's own terms (Method.cost overridden), else BY_CLASS's for its class (or a parent's), else the
    generic default."""
    from ..methods.base import Method

    own = type(method).cost
    if own is not Method.cost:
        return own(method, shapes, plan)
    for cls in type(method).__mro__:
        if cls.__name__ in BY_CLASS:
            return BY_CLASS[cls.__name__](method, shapes, plan)
    return default_cost(method, shapes, plan)
