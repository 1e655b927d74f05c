"""Test environment: offline, no wandb account, Triton kernels interpreted on CPU.

Set before anything imports transformers, wandb or triton (kernels read TRITON_INTERPRET when
they are defined).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
