"""The cost model: a training step's peak device memory, FLOPs and memory traffic from the model's shapes, the
method's cost terms (Cost: smt_bench/forecast/costs.py, or the method's own `Method.cost`) and the step's setup
(batch, sequence length, accumulation, gradient checkpointing, ranks and strategy). Nothing here loads a weight.

Memory follows what the harness holds (smt_bench/trainer.py): fp32 base weights on the device, bf16 autocast on
CUDA and fp32 on the CPU, AdamW moments in fp32. A step's peak is the largest of its phases, each the live
tensors at that moment (the persistent ones: the method's added parameters and the optimizer moments, which exist
from the second step on):

- the loss: every activation saved for backward, plus the loss's vocabulary-sized tensors (log-softmax output, its
  gradient and the logits' gradient); with gradient accumulation the gradients of earlier micro-batches too;
- a forward temporary of the method's own (DoRA's weight-sized products for its norms);
- the end of backward: every gradient, the first layer's activations and a layer's backward temporaries;
- the optimizer step: every gradient and AdamW's foreach temporary (one trainable-sized tensor).

Saved activations per decoder layer (HF LLaMA, what autograd keeps when the gradient flows through the layer):
the residual stream at both norms (fp32), the rotated queries and keys, the values, the attention output, the
MLP's gate, its activation and up projection; plus the inputs of every linear whose weight trains (and the
normalised input of a trained norm), and what the method's own modules save. Under CUDA autocast a frozen
linear's weight enters the graph as its bf16 copy, which autograd keeps for backward (2 bytes per weight in the
gradient's path). Gradient checkpointing keeps each layer's input and recomputes one layer at a time.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .devices import Device

MIB = 2 ** 20


@dataclass(frozen=True)
class Arch:
    """What the model contributes: sizes of a LLaMA-style decoder (attention + gated MLP + RMSNorm) read from its
    config and meta shapes. Another decoder gets the same formulas from its sizes (an approximation)."""

    layers: int
    hidden: int
    intermediate: int
    q_dim: int  # heads × head_dim
    kv_dim: int  # key-value heads × head_dim
    vocab: int
    tied: bool
    total_params: int
    layer_linear: tuple[tuple[str, int, int], ...]  # one layer's linears: (suffix, d_out, d_in)
    layer_params: int  # one decoder layer's parameters (its linears and norms)

    @classmethod
    def from_shapes(cls, shapes: Any) -> "Arch":
        c = shapes.hf_config
        L = int(c.num_hidden_layers)
        heads = int(c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        first = shapes.linears[0].name.split(".")
        idx = next((i for i, p in enumerate(first) if p.isdigit()), None)
        prefix = ".".join(first[: idx + 1]) + "." if idx is not None else ""
        mine = tuple((l.name.rsplit(".", 1)[-1], l.d_out, l.d_in) for l in shapes.linears
                     if prefix and l.name.startswith(prefix))
        h = int(c.hidden_size)
        return cls(layers=L, hidden=h, intermediate=int(c.intermediate_size), q_dim=heads * head_dim,
                   kv_dim=kv * head_dim, vocab=int(c.vocab_size), tied=bool(getattr(c, "tie_word_embeddings", False)),
                   total_params=int(shapes.total_params), layer_linear=mine,
                   layer_params=sum(o * i for _, o, i in mine) + 2 * h)

    @property
    def linear_params(self) -> int:
        """Σ d_out·d_in over the decoder layers' linears (the lm_head apart)."""
        return self.layers * sum(o * i for _, o, i in self.layer_linear)

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def at_depth(self, layers: int) -> "Arch":
        """The same model cut to `layers` decoder layers (the benchmarks' depths)."""
        return replace(self, layers=layers, total_params=self.total_params - (self.layers - layers) * self.layer_params)

    def linear(self, suffix: str) -> tuple[int, int] | None:
        return next(((o, i) for s, o, i in self.layer_linear if s == suffix), None)


@dataclass(frozen=True)
class Setup:
    """One rank's step: `batch` sequences of `seq` tokens per micro-batch, `grad_accum` micro-batches per optimizer
    step, over `world` ranks with the method's strategy (single / ddp / fsdp2 / allreduce). `padded`: batches carry a
    padding mask (grouped-query attention then repeats keys and values to every head, as transformers' sdpa path
    does with a mask)."""

    batch: int
    seq: int
    grad_accum: int = 1
    checkpointing: bool = False
    world: int = 1
    strategy: str = "single"
    padded: bool = True

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class Warmup:
    """A method's own phase before training (SMT's warm-up), in the terms the model needs."""

    passes: int  # forward (and backward) passes of one micro-batch
    backward: bool  # gradient signal (else forward passes only)
    trained_linear: int  # parameters whose dW the warm-up computes
    trained_inputs: float  # elements per token saved for those dW (inputs of the scored linears)
    device_bytes: int  # what it holds on the device for the whole phase (grad_sum accumulators, scores)
    host_bytes: int  # what it holds in host memory (accumulator_device=cpu: fp32 sums and pinned staging)
    grad_temp: int  # bytes: one dense weight gradient at a time, and the statistic's copy of it
    full_ft: bool = False  # warmup_mode=update: AdamW steps on the whole model
    what: str = ""


@dataclass(frozen=True)
class Cost:
    """A method's cost terms on one model at one budget (whole model; per token where it says so)."""

    trainable: int  # parameters with a gradient and AdamW moments
    added: int = 0  # parameters the method adds beside the base weights (fp32)
    trained_linear: int = 0  # base linear parameters whose weight gradient is computed (dW FLOPs)
    trained_inputs: float = 0.0  # elements per token saved for those dW (inputs of trained linears and norms)
    own_saved: float = 0.0  # elements per token the method's own modules save (adapter inputs, DoRA's outputs)
    own_masks: float = 0.0  # dropout-mask elements per token (fp32 on the CPU, bool on CUDA)
    own_flops_per_token: float = 0.0  # forward + backward FLOPs per token of the method's own modules
    own_flops_per_forward: float = 0.0  # FLOPs per forward that do not scale with the batch (DoRA's norms)
    own_bytes_per_forward: float = 0.0  # memory traffic per forward that does not scale with the batch
    transient: int = 0  # bytes: the largest batch-independent temporary of a forward (DoRA)
    backward_temp: float = 0.0  # elements per token: a layer's largest backward temporary on the CPU (SMT's gathers)
    backward_temp_cuda: float = 0.0  # the same on CUDA (SMT's Triton kernels gather nothing)
    no_cast_linear: int = 0  # base linear parameters whose bf16 copy is not kept for backward (SMT's own layers)
    optimizer: str = "foreach"  # foreach: AdamW's temporary of the trainable size | blocks: SMT's per-layer one
    optimizer_temp: int = 0  # bytes of the "blocks" temporary
    state_params: int | None = None  # parameters holding AdamW moments (None: trainable; LISA keep: more)
    grad_from_embeddings: bool = False  # the gradient reaches the embeddings (saves the first layer's input)
    head_trains: bool = False  # lm_head's weight trains (its input saved, its V×h gradient)
    warmup: Warmup | None = None
    notes: tuple[str, ...] = ()  # where these terms are approximate


@dataclass
class Memory:
    """Per rank, bytes. `peak` = weights + the rest at the peak phase; `growth` = peak − weights (what a run
    measures: its peak above the loaded model)."""

    weights: int
    added: int
    gradients: int
    optimizer: int
    optimizer_step: int
    activations: int
    activations_checkpointed: int
    activations_full: int
    logits: int
    cast_copies: int
    method: int
    parallel: int
    overhead: int
    phase: str
    peak: int
    growth: int
    warmup_peak: int | None = None
    warmup_growth: int | None = None
    warmup_host: int = 0
    notes: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items()
                if isinstance(v, int) and k not in ("peak", "growth", "warmup_peak", "warmup_growth")}


def _bytes(device: Device) -> tuple[int, int, int, float]:
    """(residual-stream bytes, compute-dtype bytes, dropout-mask bytes, bytes per vocabulary entry per token at the
    loss's peak)."""
    if device.precision == "bf16":  # logits bf16 + their fp32 copy, log-softmax out, its gradient, the bf16 grad
        return 4, 2, 1, 14.0
    return 4, 4, 4, 12.0  # log-softmax output, its incoming gradient, the logits' gradient


def layer_elements(arch: Arch, padded: bool) -> tuple[float, float]:
    """(residual, compute) elements per token one decoder layer saves when the gradient flows through it and none
    of its weights train."""
    kv = arch.q_dim if (padded and arch.kv_dim != arch.q_dim) else arch.kv_dim  # repeat_kv under a mask
    return 2.0 * arch.hidden, 2.0 * arch.q_dim + 2.0 * kv + 3.0 * arch.intermediate


def memory(arch: Arch, cost: Cost, setup: Setup, device: Device, overhead: int = 0) -> Memory:
    rb, cb, mb, vb = _bytes(device)
    T, L, W = setup.tokens, arch.layers, max(1, setup.world)
    fsdp = setup.strategy == "fsdp2" and W > 1
    shard = W if fsdp else 1
    weights = 4 * arch.total_params // shard
    added = 4 * cost.added // shard
    grads = 4 * cost.trainable // shard
    states = 8 * (cost.state_params if cost.state_params is not None else cost.trainable) // shard
    opt_temp = (4 * cost.trainable // shard) if cost.optimizer == "foreach" else cost.optimizer_temp
    res, comp = layer_elements(arch, setup.padded)
    layer = T * (rb * res + cb * comp)
    method = T * (cb * (cost.trained_inputs + cost.own_saved) + mb * cost.own_masks)
    nonlayer = T * (rb * arch.hidden + (cb * arch.hidden if cost.head_trains else 0))
    first_missing = 0 if cost.grad_from_embeddings else T * rb * arch.hidden
    full = L * layer + method + nonlayer - first_missing
    ckpt = L * T * rb * arch.hidden + nonlayer + layer + method / max(L, 1)
    acts = int(ckpt if setup.checkpointing else full)
    logits = int(T * arch.vocab * vb)
    cast = 0
    if device.precision == "bf16":  # bf16 copies of the weights in the gradient's path, kept for backward
        cast = 2 * max(0, arch.linear_params + arch.head_params - cost.no_cast_linear)
        if setup.checkpointing:  # one layer's at a time (the recomputed one), plus the head
            cast = 2 * (arch.linear_params // max(L, 1) + arch.head_params)
    parallel = 0
    if fsdp:  # the current and the prefetched layer gathered, one layer's gradient before its reduce-scatter
        parallel = 4 * 3 * arch.layer_params
    elif W > 1 and setup.strategy in ("ddp", "allreduce"):  # DDP's buckets / the flat all-reduce copy
        parallel = 4 * cost.trainable
    persistent = added + states
    accumulated = grads if setup.grad_accum > 1 else 0
    first_layer = int(layer + method / max(L, 1))
    phases = {
        "loss": persistent + acts + logits + cast + accumulated + (parallel if fsdp else 0),
        "forward temporary": persistent + acts + cast + accumulated + cost.transient,
        "end of backward": persistent + grads + first_layer + parallel
                           + int(T * cb * (cost.backward_temp if device.kind == "cpu" else cost.backward_temp_cuda)),
        "optimizer step": persistent + grads + opt_temp + (parallel if not fsdp else 0),
    }
    phase = max(phases, key=lambda k: phases[k])
    growth = phases[phase] + overhead
    m = Memory(weights=weights, added=added, gradients=grads, optimizer=states, optimizer_step=opt_temp,
               activations=acts, activations_checkpointed=int(ckpt), activations_full=int(full), logits=logits,
               cast_copies=cast, method=int(cost.transient), parallel=parallel, overhead=overhead, phase=phase,
               peak=weights + growth, growth=growth, notes=list(cost.notes))
    if cost.warmup is not None:
        m.warmup_growth = warmup_memory(arch, cost.warmup, setup, device, overhead)
        m.warmup_peak = weights + m.warmup_growth
        m.warmup_host = cost.warmup.host_bytes
    return m


def warmup_memory(arch: Arch, w: Warmup, setup: Setup, device: Device, overhead: int) -> int:
    """The method's own phase: its accumulators for the whole phase, then the larger of the loss's moment (every
    activation, the scored linears' inputs, the vocabulary-sized tensors) and a scored layer's backward (one dense
    gradient and its statistic's copy). warmup_mode=update is a full fine-tuning step."""
    rb, cb, mb, vb = _bytes(device)
    T = setup.tokens
    if w.full_ft:
        ft = Cost(trainable=arch.total_params, trained_linear=arch.linear_params + arch.head_params,
                  trained_inputs=_full_inputs(arch), grad_from_embeddings=True, head_trains=True)
        return memory(arch, ft, replace(setup, grad_accum=1), device, overhead).growth + w.device_bytes
    res, comp = layer_elements(arch, setup.padded)
    acts = T * (arch.layers * (rb * res + cb * comp) + cb * w.trained_inputs + rb * arch.hidden)
    if not w.backward:  # forward passes only: one layer's input at a time
        return int(w.device_bytes + T * (rb * arch.hidden + cb * comp) + T * arch.vocab * 4 + overhead)
    cast = 2 * (arch.linear_params + arch.head_params) if device.precision == "bf16" else 0
    loss = acts + T * arch.vocab * vb + cast
    layer = T * (rb * res + cb * comp) + w.grad_temp + cast
    return int(w.device_bytes + max(loss, layer) + overhead)


def _full_inputs(arch: Arch) -> float:
    """Elements per token full fine-tuning saves beyond the frozen graph: each layer's normalised inputs (both norms
    train), the q/k/v and gate/up input, the MLP product down_proj reads (o_proj reads the attention output, saved
    anyway)."""
    return arch.layers * (2 * arch.hidden + 2 * arch.hidden + arch.intermediate)


def flops(arch: Arch, cost: Cost, setup: Setup) -> float:
    """FLOPs of one optimizer step on one rank: the forward (2 per weight and token, plus causal attention), the
    backward's input gradients through every layer (2 per weight) and attention (twice the forward's), the weight
    gradients of what trains (2 per trained weight), the recomputed forward under checkpointing, and the method's
    own work."""
    T = setup.tokens
    lin = arch.linear_params + arch.head_params
    attn = 2.0 * arch.layers * setup.seq * arch.q_dim  # per token: QKᵀ and PV, half of them masked (causal)
    fwd = T * (2.0 * lin + attn)
    bwd = T * (2.0 * lin + 2.0 * attn) + T * 2.0 * cost.trained_linear
    recompute = T * (2.0 * arch.linear_params + attn) if setup.checkpointing else 0.0
    own = T * cost.own_flops_per_token + cost.own_flops_per_forward
    return setup.grad_accum * (fwd + bwd + recompute + own)


def traffic(arch: Arch, cost: Cost, setup: Setup, device: Device, mem: Memory) -> float:
    """Bytes moved per optimizer step on one rank, to first order: the weights read in forward and backward (on
    CUDA each forward also writes and reads its bf16 copy), saved activations written and read once, the logits,
    AdamW's sweep over the trainable set (read p, g, m, v; write p, m, v; its temporary) and the method's own."""
    lin = arch.linear_params + arch.head_params
    per_weight = 10.0 if device.precision == "bf16" else 8.0
    micro = per_weight * lin + 2.0 * mem.activations + mem.logits + cost.own_bytes_per_forward
    return setup.grad_accum * micro + 36.0 * cost.trainable / (setup.world if setup.strategy == "fsdp2" else 1)


def communication_s(arch: Arch, cost: Cost, setup: Setup, device: Device) -> float:
    """Seconds per step between ranks, not overlapped with compute (an upper bound): a ring all-reduce of the
    gradients (DDP, allreduce) or FSDP2's all-gathers in forward and backward and its reduce-scatter."""
    W = setup.world
    if W <= 1 or not device.interconnect:
        return 0.0
    ring = (W - 1) / W
    if setup.strategy == "fsdp2":
        return 3 * 4 * arch.total_params * ring / device.interconnect * setup.grad_accum
    return 2 * 4 * cost.trainable * ring / device.interconnect


@dataclass
class StepTime:
    seconds: float
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    overhead_s: float
    comm_s: float


def step_time(arch: Arch, cost: Cost, setup: Setup, device: Device, mem: Memory) -> StepTime:
    """Seconds per optimizer step: compute at the device's matmul peak × its step efficiency, plus memory traffic at
    its bandwidth × efficiency (the two add: a step's operators are mostly one or the other), plus a fixed cost per
    decoder layer and micro-batch, plus communication."""
    f = flops(arch, cost, setup)
    b = traffic(arch, cost, setup, device, mem)
    compute = f / (device.flops * device.efficiency)
    mem_s = b / (device.bandwidth * device.bandwidth_efficiency)
    over = device.step_overhead_s * arch.layers * setup.grad_accum
    comm = communication_s(arch, cost, setup, device)
    return StepTime(compute + mem_s + over + comm, f, b, compute, mem_s, over, comm)


def warmup_time(arch: Arch, w: Warmup, setup: Setup, device: Device) -> float:
    """Seconds of the method's own phase: its passes' forward (and backward with the scored weights' dW)."""
    T = setup.tokens
    lin = arch.linear_params + arch.head_params
    attn = 2.0 * arch.layers * setup.seq * arch.q_dim
    per = T * (2.0 * lin + attn)
    if w.backward:
        per += T * (2.0 * lin + 2.0 * attn + 2.0 * (arch.linear_params + arch.head_params if w.full_ft
                                                     else w.trained_linear))
    traffic_b = (8.0 if device.precision == "fp32" else 10.0) * lin + (w.grad_temp + 4 * w.trained_linear
                                                                       if w.backward else 0)
    s = per / (device.flops * device.efficiency) + traffic_b / (device.bandwidth * device.bandwidth_efficiency)
    return w.passes * (s + device.step_overhead_s * arch.layers)


def gib(x: float | None) -> str:
    return "–" if x is None else f"{x / 2 ** 30:.1f}"


def hours(s: float) -> float:
    return s / 3600.0


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
