"""SpIEL (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models", arXiv 2401.16405):
sparse fine-tuning whose set of trained entries changes during training. Reference code:
github.com/AlanAnsell/peft, src/peft/tuners/sft/ (SftConfig, SparseDelta, SftSelector, SftAdamW, SftSM3);
the paper's LLaMA-2 runs: github.com/ducdauge/sft-llm (finetune/finetune.py, scripts/).

Each target matrix W (d_out × d_in) holds k of its entries as a delta: a trainable fp32 vector `spiel_delta` (k)
beside a buffer of their flat row-major indices `spiel_indices` (k, int32), as the reference's SparseDelta
(values, indices). Forward uses W + scatter(delta); backward returns the gradient of the k values only (the
weight gradient dYᵀX of the layer is formed transiently, as the reference's backward does, and only its k
entries are kept). The budget is the number of entries; it is spread over the targets in proportion to their
size (largest remainders: exact), as the reference's num_tunable_weights.

Every `reselect_every` steps (offset `accumulation_steps`, the reference's schedule) the entries change, their
count never does:
- drop: the n = int(k·p) entries of smallest |delta| (the change from the pretrained weight); their deltas are
  discarded (the weight is back to its pretrained value there);
- regrow, SpIEL-AG (`variant=ag`): during the `accumulation_steps` steps before a reselection the backward hands
  each layer's weight gradient to the method; on the first micro-batch of that window the k entries of largest
  |gradient| become the layer's candidates, and the gradient of each candidate is summed over the window. The n
  candidates of largest |Σ gradient| that are not among the remaining active entries are grown; a dropped entry
  grown again keeps its place (value and moments). The new entries' AdamW moments are seeded from the window:
  the mean gradient and mean squared gradient, scaled so that AdamW's bias correction at the current step
  returns them (the reference scales by each entry's own age; torch's AdamW has one step count per tensor);
- regrow, SpIEL-MA (`variant=ma`): the optimizer is SM3 (row and column accumulators per matrix, as the
  reference's SftSM3, momentum 0), and the n inactive entries of largest row·column accumulator product grow.
- rate p: `linear` (the reference's default): 1 at the first reselection (every entry may be replaced), then
  initial_rate·(1 − t/T); `cosine`: initial_rate·(1 + cos(πt/T))/2; T = `decay_steps`, or the run's steps.

With several ranks the window statistics are reduced over ranks (the candidates are rank 0's first micro-batch's,
the one a single process would take); everything that decides is identical on every rank.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import World
from ..errors import BudgetUnreachable, UserError
from ..models import LinearShape, ModelShapes, shapes_of
from ..schema.spec import count, invalid, nonempty_list, one_of, optional, param, shown, within
from .base import Context, Method, Plan, Tuned

VARIANTS = ("ag", "ma")  # SpIEL-AG: accumulated gradients (AdamW) | SpIEL-MA: SM3 momentum approximation
POLICIES = ("linear", "cosine")  # the reference's reselection_rate_policy
INDEX_LIMIT = 2 ** 31  # flat indices are int32 (the reference's choice below this size)
EXPORT_FILE = "spiel_delta.safetensors"


# --- the layer ---------------------------------------------------------------------------------------
class _SparseDeltaFn(torch.autograd.Function):
    """y = x (W + scatter(values))ᵀ + b; backward returns dX and the gradient of the k values."""

    @staticmethod
    def forward(ctx, x, values, layer):
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = torch.promote_types(x.dtype, layer.base.weight.dtype)
        bias = layer.base.bias
        y = F.linear(x.to(dtype), layer.delta_weight(values, dtype), None if bias is None else bias.to(dtype))
        ctx.layer, ctx.dtype, ctx.version = layer, dtype, layer.spiel_indices._version
        ctx.save_for_backward(x, values)  # the input itself (q, k, v share it), not a cast copy
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        layer = ctx.layer
        if layer.spiel_indices._version != ctx.version:
            raise RuntimeError(f"{layer.target}: SpIEL's indices changed between forward and backward")
        dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype)
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ layer.delta_weight(values, ctx.dtype)).reshape(x.shape).to(x.dtype)
        observe = layer.observer
        if ctx.needs_input_grad[1] or observe is not None:
            # the layer's weight gradient, one layer at a time and freed at once; kept: its k active entries
            dw = dy2.t() @ x.reshape(-1, x.shape[-1]).to(ctx.dtype)
            if observe is not None:
                observe(layer, dw)
            if ctx.needs_input_grad[1]:
                dvalues = dw.view(-1).index_select(0, layer.spiel_indices).to(values.dtype)
        return dx, dvalues, None


class SparseDeltaLinear(nn.Module):
    """A frozen nn.Linear plus k trainable entries of its weight: `spiel_delta` at flat `spiel_indices`."""

    spiel_indices: torch.Tensor  # a buffer (int32, flat row-major indices into the weight)

    def __init__(self, base: nn.Linear, indices: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        dev = base.weight.device
        self.register_buffer("spiel_indices", indices.to(device=dev, dtype=torch.int32))
        self.spiel_delta = nn.Parameter(torch.zeros(len(indices), dtype=torch.float32, device=dev))
        self.target = ""  # the module's name in the model
        # set while SpIEL-AG collects gradients for a reselection: called with (layer, dense weight gradient)
        self.observer: Optional[Callable[[SparseDeltaLinear, torch.Tensor], None]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaFn.apply(x, self.spiel_delta, self)

    def delta_weight(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W + scatter(values), summed in fp32 (or the weight's wider dtype), then cast to `dtype`."""
        w = self.base.weight.detach()
        merged = w.to(torch.promote_types(w.dtype, values.dtype), copy=True)
        merged.view(-1).index_add_(0, self.spiel_indices, values.detach().to(merged.dtype))
        return merged.to(dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base nn.Linear with the delta added into its weight (the same sum forward computes)."""
        w = self.base.weight
        w.view(-1).index_add_(0, self.spiel_indices, self.spiel_delta.detach().to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, entries={self.spiel_delta.numel()}"


class SparseSM3(torch.optim.Optimizer):
    """SM3 (Anil et al. 2019) on sparse deltas, as the reference's SftSM3 for 2-D targets: one accumulator per row
    and per column of each matrix; an entry's ν = min(row, column accumulator) + g², the accumulators take the max
    of ν over their entries, and the entry moves by lr·g/√(ν + ε). Momentum 0 (the reference's runs); weight decay
    decoupled, after the update (the reference's)."""

    def __init__(self, layers: Iterable[SparseDeltaLinear], lr: float, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        layers = list(layers)
        self.layers = {id(l.spiel_delta): l for l in layers}
        super().__init__([l.spiel_delta for l in layers], dict(lr=lr, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                layer = self.layers[id(p)]
                st = self.state[p]
                if not st:
                    st["row"] = torch.zeros(layer.out_features, dtype=torch.float32, device=p.device)
                    st["col"] = torch.zeros(layer.in_features, dtype=torch.float32, device=p.device)
                idx = layer.spiel_indices.long()
                rows, cols = idx // layer.in_features, idx % layer.in_features
                g = p.grad.float()
                nu = torch.minimum(st["row"][rows], st["col"][cols]).addcmul_(g, g)
                st["row"].scatter_reduce_(0, rows, nu, "amax", include_self=True)
                st["col"].scatter_reduce_(0, cols, nu, "amax", include_self=True)
                p.add_((g * (nu + group["eps"]).rsqrt()).to(p.dtype), alpha=-group["lr"])
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


# --- drop and regrow (one matrix) ---------------------------------------------------------------------
def dropped_slots(values: torch.Tensor, n: int) -> torch.Tensor:
    """The n slots of smallest |delta|, smallest first (ties: the lower slot)."""
    return torch.sort(values.abs(), stable=True).indices[:n]


def regrow_by_gradient(values: torch.Tensor, indices: torch.Tensor, n: int, candidates: torch.Tensor,
                       score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """SpIEL-AG's step for one matrix (the reference's select_rigl). Drops the n entries of smallest |delta|;
    grows the n candidates of largest score that are not among the remaining active entries (ties: the lower
    flat index, as `candidates` is sorted). A dropped entry that is grown again stays in its slot; of the others,
    the best-scored new entries take the slots of the smallest dropped ones. Returns (the slots that change, the
    positions in `candidates` of the entries that fill them, how many dropped entries were grown again)."""
    idx, candidates = indices.long(), candidates.long()
    drop = dropped_slots(values, n)
    keep = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
    keep[drop] = False
    pos = torch.nonzero(~torch.isin(candidates, idx[keep])).squeeze(1)
    best = pos[torch.sort(score[pos], descending=True, stable=True).indices[:n]]
    grown, dropped = candidates[best], idx[drop]
    again = torch.isin(dropped, grown)
    best = best[~torch.isin(grown, dropped)]
    return drop[~again][: len(best)], best, int(again.sum())


def regrow_by_momentum(values: torch.Tensor, indices: torch.Tensor, n: int,
                       score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SpIEL-MA's step for one matrix (the reference's select_sm3): drops the n entries of smallest |delta| and
    grows the n inactive entries of largest `score` (dense, flat). Returns (slots, their new flat indices)."""
    n = min(n, score.numel() - len(indices))
    score = score.clone()
    score[indices.long()] = -math.inf
    return dropped_slots(values, n), torch.topk(score, n).indices


def allocate(sizes: list[int], total: int) -> list[int]:
    """`total` entries over matrices in proportion to their sizes, exactly: floors, then one more for the
    largest remainders (ties: the earlier matrix). Never more than a matrix holds while total <= sum(sizes)."""
    pool = sum(sizes)
    out = [total * s // pool for s in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % pool), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _per_matrix(names: Iterable[str], counts: Iterable[int]) -> dict[str, list[int]]:
    """{module suffix: [fewest, most] entries of one matrix}: the compact form of an allocation."""
    out: dict[str, list[int]] = {}
    for name, k in zip(names, counts):
        lo_hi = out.setdefault(name.rsplit(".", 1)[-1], [k, k])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], k), max(lo_hi[1], k)
    return out


def apply_export(model: nn.Module, path: str | Path) -> nn.Module:
    """Adds an exported SpIEL delta (`spiel_delta.safetensors`) into the base model's weights, in place."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with torch.no_grad():
        for name in sorted({k.rsplit(".", 1)[0] for k in tensors}):
            w = model.get_submodule(name).weight
            w.view(-1).index_add_(0, tensors[f"{name}.indices"].to(w.device),
                                  tensors[f"{name}.values"].to(w.device, w.dtype))
    return model


# --- the method ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpIEL(Method):
    # the reference's LLaMA runs (sft-llm finetune.py): every linear layer of the decoder
    target_modules: list[str] = param(valid=nonempty_list(), factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    variant: str = param("ag", one_of(VARIANTS))  # ag: accumulated gradients (AdamW) | ma: SM3 momenta (SM3)
    reselect_every: int = param(5, count(1))  # paper / reference: 20; 5 reselects 4 times in the 20-step run
    # steps of gradient accumulation for the regrowth before each reselection (and its offset in the
    # interval); reference: 5
    accumulation_steps: int = param(2, count(1))
    initial_rate: float = param(0.2, within(0, 1, lo_open=True))  # the reference's initial_reselection_rate
    rate_policy: str = param("linear", one_of(POLICIES))  # the reference's reselection_rate_policy
    # T of the rate's decay; null: the run's train.max_steps (where the caller gives none: no decay)
    decay_steps: Optional[int] = param(None, optional(count(1), "(the run's train.max_steps)"))
    selection_seed: Optional[int] = param(None, optional(count(0), "(the run's seed)"))  # the initial random entries
    parallel: ClassVar[str] = "allreduce"  # the trained entries change; DDP fixes its buckets at wrap time

    @staticmethod
    def check_config(cfg, at: str) -> None:
        if cfg.accumulation_steps >= cfg.reselect_every:
            raise invalid(f"{at}.accumulation_steps", cfg.accumulation_steps,
                          f"less than {at}.reselect_every={cfg.reselect_every} (reselections come "
                          f"accumulation_steps steps into each interval)")

    # --- planning (shapes only) ---
    def _targets(self, shapes: ModelShapes) -> list[LinearShape]:
        have = sorted({l.name.rsplit(".", 1)[-1] for l in shapes.linears})
        missing = [t for t in self.target_modules if t not in have]
        if missing:
            raise UserError(f"method.target_modules={shown(self.target_modules)}: {', '.join(missing)} matches no "
                            f"linear layer; choose from {', '.join(have)}")
        targets = shapes.select(self.target_modules)
        big = [l.name for l in targets if l.d_out * l.d_in >= INDEX_LIMIT]
        if big:
            raise UserError(f"{big[0]} has 2^31 or more entries, beyond SpIEL's int32 indices; leave it out of "
                            f"method.target_modules")
        return targets

    def plan(self, shapes: ModelShapes, target_params: int) -> Plan:
        targets = self._targets(shapes)
        sizes = [l.d_out * l.d_in for l in targets]
        pool = sum(sizes)
        if not 1 <= target_params <= pool:
            raise BudgetUnreachable(
                f"budget of {target_params:,} params is unreachable for {self.name}: its {len(targets)} target "
                f"matrices ({', '.join(self.target_modules)}) hold {pool:,} weights "
                f"({pool / shapes.total_params:.1%} of the model), so 1..{pool:,} entries; choose another budget")
        counts = allocate(sizes, target_params)
        return Plan(target_params, target_params, {
            "entries": target_params, "matrices": sum(1 for k in counts if k),
            "density_of_targets": target_params / pool, "per_matrix": _per_matrix((l.name for l in targets), counts)})

    def counts(self, model: nn.Module, entries: int) -> dict[str, int]:
        """Each target's entries (those with none are left as they are)."""
        targets = self._targets(shapes_of(model))
        return {l.name: k for l, k in zip(targets, allocate([l.d_out * l.d_in for l in targets], entries)) if k}

    # --- building ---
    def prepare(self, model: nn.Module, plan: Plan, context: Context | None) -> "SpIELTuned":
        """The initial entries are uniform at random in each matrix (the reference's random_subset), seeded by
        selection_seed or the run's seed, drawn on the weights' device."""
        seed = self.selection_seed if self.selection_seed is not None else (context.seed if context else 0)
        gens: dict[torch.device, torch.Generator] = {}
        indices = {}
        for name, k in self.counts(model, plan.achieved_params).items():
            w = model.get_submodule(name).weight
            gen = gens.setdefault(w.device, torch.Generator(device=w.device).manual_seed(seed))
            draw = torch.rand(w.numel(), generator=gen, device=w.device)
            indices[name] = torch.topk(draw, k, sorted=False).indices.sort().values
        return self._build(model, indices, context)

    def resume(self, model: nn.Module, plan: Plan, context: Context | None, state: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> "SpIELTuned":
        """The checkpoint's entries, as they are (no initial draw)."""
        suffix = ".spiel_indices"
        saved = {n[: -len(suffix)]: len(t) for n, t in state.items() if n.endswith(suffix)}
        want = self.counts(model, plan.achieved_params)  # in the model's order: the optimizer's parameter order
        if saved != want:
            raise ValueError(f"checkpoint does not match this {self.name} plan ({len(saved)} matrices, "
                             f"{sum(saved.values()):,} entries; planned {plan.achieved_params:,})")
        tuned = self._build(model, {n: state[n + suffix] for n in want}, context)
        tuned.load_state_dict(state, meta)
        return tuned

    def _build(self, model: nn.Module, indices: dict[str, torch.Tensor], context: Context | None) -> "SpIELTuned":
        for p in model.parameters():
            p.requires_grad_(False)
        total = sum(p.numel() for p in model.parameters())
        layers: dict[str, SparseDeltaLinear] = {}
        for name, idx in indices.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            layer = SparseDeltaLinear(getattr(owner, child), idx)
            layer.target = name
            setattr(owner, child, layer)
            layers[name] = layer
        return SpIELTuned(self, model, layers, context, total)


@dataclass
class _Window:
    """SpIEL-AG's statistics of one matrix over the steps before a reselection."""

    candidates: torch.Tensor  # flat indices (int32, ascending): the top-k |gradient| of the window's first micro-batch
    grad_sum: torch.Tensor  # Σ over the window's steps of each candidate's step gradient
    grad_sq: torch.Tensor  # Σ of its square
    step_grad: torch.Tensor  # the step in progress (its micro-batches so far)
    steps: int = 0


class SpIELTuned(Tuned):
    method: SpIEL

    def __init__(self, method: SpIEL, model: nn.Module, layers: dict[str, SparseDeltaLinear],
                 context: Context | None, total_params: int) -> None:
        super().__init__(method, model)
        self.layers = layers
        self.world = context.world if context is not None else World()
        self.accumulation = context.accumulation if context is not None else 1
        run_steps = context.max_steps if context is not None else 0  # 0: the caller does not know the run's length
        self.decay_steps: int | None = method.decay_steps or run_steps or None
        self.total_params = total_params
        self.pool = sum(l.in_features * l.out_features for l in layers.values())
        self.windows: dict[str, _Window] = {}
        self.calls = 0  # backward calls of the window step in progress (every matrix, every micro-batch)
        self.history: list[dict[str, Any]] = []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [l.spiel_delta for l in self.layers.values()]

    def build_optimizer(self, betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        if self.method.variant == "ma":
            return SparseSM3(self.layers.values(), lr=self.method.lr, eps=eps, weight_decay=self.method.weight_decay)
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.method.lr, betas=tuple(betas), eps=eps,
                                 weight_decay=self.method.weight_decay, foreach=True)

    # --- the schedule ---
    def rate(self, done: int) -> float:
        """The fraction of each matrix's entries a reselection after `done` steps drops (and regrows)."""
        m, T = self.method, self.decay_steps
        if T is not None and done >= T:
            return 0.0
        if m.rate_policy == "linear":
            if done == m.accumulation_steps:  # the first reselection: every entry may be replaced
                return 1.0
            return m.initial_rate * (1 - done / T) if T else m.initial_rate
        return m.initial_rate * (1 + math.cos(math.pi * done / T)) / 2 if T else m.initial_rate

    def begin_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        R, A = self.method.reselect_every, self.method.accumulation_steps
        done = step - 1
        changed = False
        if done >= A and done % R == A:
            changed = self._reselect(done, optimizer)
            self.windows.clear()
        # SpIEL-AG collects in the A steps before a reselection (none before one that would change nothing)
        collect = self.method.variant == "ag" and done % R < A and self.rate(done - done % R + A) > 0
        for layer in self.layers.values():
            layer.observer = self._observe if collect else None
        return changed

    # --- SpIEL-AG's window ---
    def _observe(self, layer: SparseDeltaLinear, dw: torch.Tensor) -> None:
        flat = dw.reshape(-1)
        win = self.windows.get(layer.target)
        if win is None:  # the window's first micro-batch: the candidates (the reference's: top-k |gradient|)
            k = layer.spiel_delta.numel()
            cand = torch.topk(flat.abs(), k, sorted=False).indices
            if self.world.distributed:  # rank 0's micro-batch, the one a single process sees first
                if not self.world.is_main:
                    cand.zero_()
                self.world.all_reduce(cand)
            zeros = torch.zeros(k, dtype=torch.float32, device=flat.device)
            win = self.windows[layer.target] = _Window(cand.sort().values.to(torch.int32), zeros, zeros.clone(),
                                                       zeros.clone())
        win.step_grad += flat.index_select(0, win.candidates).float()
        self.calls += 1
        if self.calls == len(self.layers) * self.accumulation:  # the step's last backward of the last matrix
            self._end_window_step()

    def _end_window_step(self) -> None:
        wins = [self.windows[n] for n in self.layers if n in self.windows]
        if self.world.distributed:  # the step gradient: the mean over ranks, as the values' own gradients
            flat = torch.cat([w.step_grad for w in wins])
            self.world.all_reduce(flat)
            flat /= self.world.world_size
            for w, part in zip(wins, flat.split([len(w.step_grad) for w in wins])):
                w.step_grad.copy_(part)
        for w in wins:
            w.grad_sum += w.step_grad
            w.grad_sq.addcmul_(w.step_grad, w.step_grad)
            w.steps += 1
            w.step_grad.zero_()
        self.calls = 0

    # --- reselection ---
    @torch.no_grad()
    def _reselect(self, done: int, optimizer: torch.optim.Optimizer) -> bool:
        p = self.rate(done)
        if p <= 0:
            return False
        replaced = again = 0
        for name, layer in self.layers.items():
            values, indices = layer.spiel_delta, layer.spiel_indices
            n = int(values.numel() * p)
            if n == 0:
                continue
            if self.method.variant == "ag":
                win = self.windows.get(name)
                if win is None or win.steps == 0:
                    continue
                mean = win.grad_sum / win.steps
                slots, pos, kept = regrow_by_gradient(values, indices, n, win.candidates, mean.abs())
                new = win.candidates[pos].long()
                self._seed_adam(optimizer, values, slots, mean[pos], win.grad_sq[pos] / win.steps)
                again += kept
            else:
                st = optimizer.state.get(values)
                if not st:
                    continue
                slots, new = regrow_by_momentum(values, indices, n, torch.outer(st["row"], st["col"]).view(-1))
            indices[slots] = new.to(indices.dtype)
            values[slots] = 0.0
            replaced += len(slots)
        self.history.append({"step": done + 1, "rate": round(p, 6), "replaced": replaced, "kept": again})
        return replaced > 0

    @staticmethod
    def _seed_adam(optimizer: torch.optim.Optimizer, param: torch.Tensor, slots: torch.Tensor,
                   mean: torch.Tensor, mean_sq: torch.Tensor) -> None:
        """The regrown entries' moments: the window's mean gradient and mean squared gradient, times AdamW's
        (1 − βᵗ) at the current step t, so that its bias correction returns them (as if the entry had seen that
        gradient all along)."""
        st = optimizer.state.get(param)
        if not st or "exp_avg" not in st:
            return
        group = next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))
        b1, b2 = group["betas"]
        t = float(st["step"])
        st["exp_avg"][slots] = (mean * (1 - b1 ** t)).to(st["exp_avg"].dtype)
        st["exp_avg_sq"][slots] = (mean_sq * (1 - b2 ** t)).to(st["exp_avg_sq"].dtype)

    # --- checkpoints ---
    WINDOW = ("candidates", "grad_sum", "grad_sq", "step_grad")

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.spiel_delta"] = layer.spiel_delta.detach()
            tensors[f"{name}.spiel_indices"] = layer.spiel_indices
            win = self.windows.get(name)
            if win is not None:
                tensors.update({f"{name}.spiel_{k}": getattr(win, k) for k in self.WINDOW})
        return tensors, {"history": self.history, "calls": self.calls,
                         "window_steps": {n: w.steps for n, w in self.windows.items()}}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        steps = meta.get("window_steps", {})
        want = {f"{n}.spiel_{k}" for n in self.layers for k in ("delta", "indices")}
        want |= {f"{n}.spiel_{k}" for n in steps for k in self.WINDOW}
        if set(tensors) != want:
            raise ValueError(f"checkpoint does not match the {self.method.name} model: "
                             f"{sorted(set(tensors) ^ want)[:3]}")
        with torch.no_grad():
            for name, layer in self.layers.items():
                values, idx = tensors[f"{name}.spiel_delta"], tensors[f"{name}.spiel_indices"]
                if values.shape != layer.spiel_delta.shape or idx.shape != layer.spiel_indices.shape:
                    raise ValueError(f"checkpoint's {name} holds {len(values)} entries, this plan {len(layer.spiel_delta)}")
                layer.spiel_delta.copy_(values)
                layer.spiel_indices.copy_(idx)
        dev = {n: l.spiel_delta.device for n, l in self.layers.items()}
        self.windows = {}
        for n, s in steps.items():
            cand, total, sq, now = (tensors[f"{n}.spiel_{k}"].to(dev[n], copy=True) for k in self.WINDOW)
            self.windows[n] = _Window(cand.to(torch.int32), total, sq, now, int(s))
        self.history = [dict(h) for h in meta.get("history", [])]
        self.calls = int(meta.get("calls", 0))

    # --- after training ---
    def report(self) -> dict[str, Any]:
        n = sum(l.spiel_delta.numel() for l in self.layers.values())
        m = self.method
        return {"variant": m.variant, "entries": n, "density_of_model": n / self.total_params,
                "density_of_targets": n / self.pool,
                "per_matrix": _per_matrix(self.layers, (l.spiel_delta.numel() for l in self.layers.values())),
                "reselect_every": m.reselect_every, "accumulation_steps": m.accumulation_steps,
                "rate_policy": m.rate_policy, "initial_rate": m.initial_rate, "decay_steps": self.decay_steps,
                "reselections": self.history}

    def export(self, directory: str | Path, base_model: str) -> list[str]:
        """Per target: `<module>.indices` (flat row-major into its d_out × d_in weight) and `<module>.values`
        (fp32); W.view(-1)[indices] += values applies them (`apply_export`)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        shapes: dict[str, list[int]] = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.indices"] = layer.spiel_indices.detach().cpu().contiguous()
            tensors[f"{name}.values"] = layer.spiel_delta.detach().cpu().contiguous()
            shapes[name] = [layer.out_features, layer.in_features]
        path = f"{directory}/{EXPORT_FILE}"
        save_file(tensors, path, metadata={"base_model": base_model, "method": "spiel",
                                           "layout": "flat row-major indices into each weight [d_out, d_in]",
                                           "shapes": json.dumps(shapes)})
        return [path]

    def merged(self) -> nn.Module:
        for name, layer in self.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, layer.merged())
        return self.model
