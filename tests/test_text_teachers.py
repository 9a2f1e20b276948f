"""Text-conditioned teachers: diffusers ``UNet2DConditionModel`` (epsilon, v-prediction) with
prompt embeddings as the condition (issue 12, item 3), CFG with the null prompt, the text-pairs
data module, the CLI fit, export to a diffusers pipeline that takes prompt embeddings and, with
a text encoder in the teacher folder, prompts; and the errors before work (item 4).

Every model is tiny, random and built here (no downloads).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from scm_lightning.teachers.conditioning import TextCondition

EMBED_DIM = 12  # the tiny UNet's cross_attention_dim
TOKENS = 5  # prompt length L
NUM_PAIRS = 96
VOCAB = ["a", "one", "two", "three", "digit", "of", "the", "zero"]


def tiny_cond_unet(seed: int = 0, cross_attention_dim: int = EMBED_DIM):
    """A random SD-style UNet2DConditionModel: 1×8×8 images, cross-attention of width 12."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    net = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    for p in net.parameters():  # a non-trivial teacher (zero-initialised outputs otherwise)
        p.data.add_(0.05 * torch.randn_like(p))
    return net.eval()


def write_sd_teacher(
    path: Path, prediction_type: str = "epsilon", scheduler: str = "DDIMScheduler", **unet
) -> Path:
    """A tiny SD-style teacher folder: unet/ + scheduler/ (scaled-linear betas, as SD)."""
    import diffusers

    tiny_cond_unet(**unet).save_pretrained(path / "unet")
    sched = getattr(diffusers, scheduler)(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )
    sched.save_config(path / "scheduler")
    return path


def write_tiny_text_encoder(path: Path, hidden: int = EMBED_DIM) -> None:
    """``text_encoder/`` (a random CLIPTextModel) and ``tokenizer/`` (CLIPTokenizer from a
    tiny vocabulary and merges written here)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    words = [*VOCAB, "<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for w in words:
        vocab.setdefault(w if w.startswith("<|") else w + "</w>", len(vocab))
    for ch in sorted({c for w in VOCAB for c in w}):  # single characters, for unknown words
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok_dir = path / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=TOKENS
    )
    tokenizer.save_pretrained(tok_dir)
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TOKENS,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(config).eval().save_pretrained(path / "text_encoder")


def write_text_pairs(
    path: Path,
    num: int = NUM_PAIRS,
    dim: int = EMBED_DIM,
    mask: bool = False,
    pooled: int | None = None,
    shards: int = 2,
) -> Path:
    """Digits images (1×8×8 in [-1, 1]) paired with an embedding of their class (a fixed
    random (L, D) table per digit plus noise), in ``shards`` files, and ``null.safetensors``."""
    from safetensors.torch import save_file

    from scm_lightning.data.digits import load_digits_tensors

    images, labels = load_digits_tensors(8)
    images, labels = images[:num], labels[:num]
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10, TOKENS, dim, generator=g)
    embeds = table[labels] + 0.1 * torch.randn(num, TOKENS, dim, generator=g)
    extra: dict[str, torch.Tensor] = {}
    null: dict[str, torch.Tensor] = {"prompt_embeds": torch.zeros(1, TOKENS, dim)}
    if mask:
        extra["attention_mask"] = torch.ones(num, TOKENS, dtype=torch.int64)
        null["attention_mask"] = torch.ones(1, TOKENS, dtype=torch.int64)
    if pooled:
        extra["pooled_prompt_embeds"] = torch.randn(num, pooled, generator=g)
        null["pooled_prompt_embeds"] = torch.zeros(1, pooled)
    path.mkdir(parents=True, exist_ok=True)
    rows = torch.arange(num).chunk(shards)
    for i, r in enumerate(rows):
        tensors = {"images": images[r], "prompt_embeds": embeds[r]}
        tensors.update({k: v[r] for k, v in extra.items()})
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(path / f"{i:03d}.safetensors")
        )
    save_file(null, str(path / "null.safetensors"))
    return path
