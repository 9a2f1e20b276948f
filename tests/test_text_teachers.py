"""Text-conditioned teachers: diffusers ``UNet2DConditionModel`` (epsilon, v-prediction) with
prompt embeddings as the condition (issue 12, item 3), CFG with the null prompt, the text-pairs
data module, the CLI fit, export to a diffusers pipeline that takes prompt embeddings and, with
a text encoder in the teacher folder, prompts; and the errors before work (item 4). Then the
flow-matching transformer teachers (SanaTransformer2DModel, SD3Transformer2DModel) and the JVP
attention on cross-attention with masks (second half of the file).

Every model is tiny, random and built here (no downloads).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import run_cli
from scm_lightning.jvp import attention_with_tangent, install_jvp_attention, jvp_attention
from scm_lightning.teachers.conditioning import TextCondition
from test_diffusers_load import LOAD_PIPELINE, run_without_project

EMBED_DIM = 12  # the tiny UNet's cross_attention_dim
TOKENS = 5  # prompt length L of the stored pairs
TEXT_TOKENS = 8  # the tiny tokenizer's model_max_length (another L: the UNet takes any)
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
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=TEXT_TOKENS
    )
    tokenizer.save_pretrained(tok_dir)
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
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


def clip_embeddings(folder: Path, prompts: list[str]) -> torch.Tensor:
    """The prompts' hidden states, computed here with transformers directly (independent of
    the pipeline's encode_prompt)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = tokenizer(
        prompts, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return encoder(input_ids=ids.input_ids).last_hidden_state


def random_condition(batch: int, dim: int = EMBED_DIM, dtype=torch.float32, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(batch, TOKENS, dim, generator=g, dtype=dtype))


# --- adapters against diffusers' own scheduler arithmetic -----------------------------------
@pytest.mark.parametrize(
    ("prediction_type", "scheduler"),
    [("epsilon", "DDIMScheduler"), ("v_prediction", "DDPMScheduler")],
)
def test_adapter_x0_equals_the_diffusers_scheduler_step(
    prediction_type: str, scheduler: str, tmp_path: Path
) -> None:
    """At the TrigFlow time of each checked DDPM timestep i, the adapter's denoised estimate
    ``x̂0 = cos t·x_t − σ_d sin t·F`` equals the ``pred_original_sample`` of diffusers' own
    ``step()`` on the UNet's output at ``x_i = √ᾱ_i·x_t/cos t`` (float64)."""
    import diffusers

    from scm_lightning.teachers.loading import load_teacher
    from scm_lightning.teachers.schedule import ScheduleAdapter

    folder = write_sd_teacher(tmp_path / "t", prediction_type, scheduler)
    teacher = load_teacher(folder, torch_dtype=torch.float64)
    assert isinstance(teacher, ScheduleAdapter) and teacher.prediction_type == prediction_type
    assert teacher.text_embed_dim == EMBED_DIM and teacher.conditional
    sched = getattr(diffusers, scheduler).from_pretrained(folder / "scheduler")
    sched.register_to_config(clip_sample=False)
    sched.set_timesteps(1000)
    unet = teacher.net
    sd = teacher.sigma_data
    cond = random_condition(3, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for i in (20, 300, 700, 990):
        ac = sched.alphas_cumprod[i].double()
        t = math.atan(math.sqrt((1 - ac) / ac) / sd)  # σ/α = σ_d·tan t at knot i
        x_t = sd * torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) / math.cos(t)
        with torch.no_grad():
            F = teacher(x_t / sd, torch.full((3,), t, dtype=torch.float64), cond)
            x0_ours = math.cos(t) * x_t - sd * math.sin(t) * F
            x_i = ac.sqrt() * x_t / math.cos(t)
            out = unet(x_i, i, encoder_hidden_states=cond.prompt_embeds).sample
            x0_ref = sched.step(out, i, x_i).pred_original_sample
        torch.testing.assert_close(x0_ours, x0_ref, rtol=1e-7, atol=1e-7)
    assert x0_ref.abs().max() > 0.1  # not trivially zero


# --- CFG with the null prompt; the student at init ------------------------------------------
def test_guided_teacher_is_cfg_with_the_null_prompt(tmp_path: Path) -> None:
    """GuidedTeacher's velocity = u + s·(c − u), c and u the teacher's velocities at the prompt
    and at the null prompt's embedding (separate calls), per-sample s."""
    from scm_lightning.teachers.guidance import GuidedTeacher, guided_velocity
    from scm_lightning.teachers.loading import load_teacher

    teacher = load_teacher(write_sd_teacher(tmp_path / "t"), torch_dtype=torch.float64)
    cond = random_condition(4, dtype=torch.float64)
    null = TextCondition(torch.zeros(1, TOKENS, EMBED_DIM, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    x_t = 0.5 * torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8, 1.2, 1.5], dtype=torch.float64)
    s = torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        c = teacher.velocity(x_t, t, cond)
        u = teacher.velocity(x_t, t, TextCondition(null.prompt_embeds.expand(4, -1, -1)))
        expected = u + s.reshape(-1, 1, 1, 1) * (c - u)
        got = guided_velocity(teacher, x_t, t, cond, s, null)
        by_module = GuidedTeacher(teacher, 1.0, null).velocity(x_t, t, cond, s)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(by_module, expected, rtol=1e-10, atol=1e-10)
    assert (c - u).abs().max() > 1e-3  # the prompt matters


def test_student_equals_teacher_at_init_and_jvp_attention_covers_cross_attention(
    tmp_path: Path,
) -> None:
    """The student (guidance input, JVP attention installed on every self- and cross-attention)
    equals the teacher for every s at init, and its JVP through the cross-attention with a
    prompt condition matches a float64 central difference."""
    from diffusers.models.attention_processor import Attention

    from scm_lightning.jvp.install import JVPAttnProcessor, install_jvp_attention
    from scm_lightning.student import Student
    from scm_lightning.teachers.loading import load_teacher

    teacher = load_teacher(write_sd_teacher(tmp_path / "t"), torch_dtype=torch.float64)
    student = Student.from_teacher(teacher, guidance_embedding=True)
    attns = [m for m in student.modules() if isinstance(m, Attention)]
    cross = [m for m in attns if m.is_cross_attention]
    assert install_jvp_attention(student) == len(attns) and cross and len(cross) < len(attns)
    assert all(isinstance(m.processor, JVPAttnProcessor) for m in attns)
    cond = random_condition(2, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    with torch.no_grad():
        ref = teacher(x, t, cond)
        for s in (1.0, 1.7, 4.0):
            got = student(x, t, cond, torch.full((2,), s, dtype=torch.float64))
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    dx = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    # No time tangent here: diffusers embeds the timestep in float32, too coarse for a
    # central difference; the tangent through the (cross-)attention is what is checked.
    dt = torch.zeros(2, dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)

    def f(x_, t_):
        return student(x_, t_, cond, ones)

    _, tangent = torch.func.jvp(f, (x, t), (dx, dt))
    h = 1e-5
    with torch.no_grad():
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-6)


def test_label_dropout_swaps_in_the_null_prompt(tmp_path: Path) -> None:
    """`pretrain`'s label dropout on prompt embeddings: each row is either its own prompt or the
    null prompt (every field), at about the dropout rate; without a null prompt it refuses."""
    from scm_lightning.modules import DiffusionModule
    from scm_lightning.teachers.loading import load_teacher

    model = load_teacher(write_sd_teacher(tmp_path / "t"))
    null = TextCondition(torch.zeros(1, TOKENS, EMBED_DIM), attention_mask=torch.ones(1, TOKENS))
    module = DiffusionModule(
        model, (1, 8, 8), lambda p: torch.optim.SGD(p, lr=0.1), label_dropout=0.5,
        uncond_condition=null,
    )  # fmt: skip
    cond = random_condition(64)
    cond = TextCondition(cond.prompt_embeds, attention_mask=torch.ones(64, TOKENS) * 2)
    out = module._labels(cond, torch.Generator().manual_seed(0))
    dropped = (out.prompt_embeds == 0).flatten(1).all(1)
    kept = (out.prompt_embeds == cond.prompt_embeds).flatten(1).all(1)
    assert bool((dropped ^ kept).all()) and 16 < int(dropped.sum()) < 48
    assert bool((out.attention_mask[:, 0] == torch.where(dropped, 1.0, 2.0)).all())
    with pytest.raises(ValueError, match="needs the null prompt"):
        DiffusionModule(model, (1, 8, 8), lambda p: torch.optim.SGD(p, lr=0.1), label_dropout=0.5)


# --- the data module ---------------------------------------------------------------------
def test_text_pairs_batches_hold_out_pairs_and_refuse_bad_folders(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from scm_lightning.data.base import eval_prompts
    from scm_lightning.data.text_pairs import TextPairsDataModule

    folder = write_text_pairs(tmp_path / "pairs", mask=True, pooled=6, shards=3)
    dm = TextPairsDataModule(folder, batch_size=8, val_size=16)
    assert (dm.channels, dm.resolution, dm.num_classes, dm.text_embed_dim) == (1, 8, None, 12)
    x, cond = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 8, 8) and isinstance(cond, TextCondition)
    assert cond.prompt_embeds.shape == (8, TOKENS, EMBED_DIM)
    assert cond.pooled_prompt_embeds.shape == (8, 6) and cond.attention_mask.shape == (8, TOKENS)
    held = eval_prompts(dm)
    assert len(held) == 16 and len(dm.base_dataset()) == NUM_PAIRS - 16
    assert sum(len(c) for _, c in dm.val_dataloader()) == 16
    train_rows = {tuple(dm.base_dataset()[i][1].prompt_embeds.flatten()[:3].tolist())
                  for i in range(len(dm.base_dataset()))}  # fmt: skip
    assert not any(tuple(r.flatten()[:3].tolist()) in train_rows for r in held.prompt_embeds)
    torch.testing.assert_close(dm.null_condition.prompt_embeds, torch.zeros(1, TOKENS, 12))
    # a null prompt of another width, and no null prompt at all
    save_file({"prompt_embeds": torch.zeros(1, TOKENS, 7)}, str(folder / "null.safetensors"))
    with pytest.raises(ValueError, match=r"null\.safetensors: prompt_embeds must be"):
        TextPairsDataModule(folder, batch_size=8, val_size=16)
    (folder / "null.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no null\.safetensors"):
        TextPairsDataModule(folder, batch_size=8, val_size=16)
    # a shard whose mask does not match its prompt length
    bad = write_text_pairs(tmp_path / "bad", num=16, shards=1)
    save_file(
        {"images": torch.zeros(16, 1, 8, 8), "prompt_embeds": torch.zeros(16, TOKENS, 12),
         "attention_mask": torch.ones(16, TOKENS + 1)},
        str(bad / "000.safetensors"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"attention_mask must be \(N, 5\) with N=16"):
        TextPairsDataModule(bad, batch_size=4, val_size=4)


# --- fit from the CLI, epsilon and v-prediction --------------------------------------------
@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_text_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prediction_type", "cfg"), [("epsilon", False), ("v_prediction", True)], ids=["eps", "v"]
)
def test_fit_debug_from_the_cli(prediction_type: str, cfg: bool, pairs: Path, tmp_path: Path):
    """``fit debug=fdr data=text_pairs teacher.path=<SD-style folder>``: training, validation,
    sample grids and the final FD (teacher and student on held-out prompts); with CFG
    distillation (the null prompt as the unconditional branch) for v-prediction."""
    teacher = write_sd_teacher(tmp_path / "teacher", prediction_type)
    # The CFG run skips the grids and the final FD (the epsilon run covers them): CI time.
    extra = (
        [
            "student.guidance_embedding=true",
            "student.guidance_scale_range=[1,2]",
            "eval=none",
            "callbacks.samples=null",
        ]
        if cfg
        else ["eval.teacher_nfes=[2]", "eval.teacher_grids=[edm]"]
    )
    res = run_cli(
        "fit",
        "debug=fdr",
        "data=text_pairs",
        f"data.path={pairs}",
        "data.val_size=16",
        "teacher=diffusers",
        f"teacher.path={teacher}",
        f"run_dir={tmp_path / 'run'}",
        *extra,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "config.yaml").is_file()
    if cfg:
        return
    last = res.stdout.strip().splitlines()[-1]
    assert "fd_teacher_nfe2=" in last and "fd_student_nfe1=" in last, last
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert all(math.isfinite(results[k]) for k in ("fd_student_nfe1", "fd_student_nfe2"))
    assert (tmp_path / "run" / "samples" / "samples_final_nfe1.png").is_file()


@pytest.mark.slow
def test_float64_runs_and_float64_jvps_take_prompt_embeddings(pairs: Path, tmp_path: Path):
    """``trainer.precision=64`` (Lightning casts the batch, TextCondition included) and a
    float64 JVP in a float32 run (the embeddings follow the JVP's dtype) both train."""
    from conftest import fit_two_steps
    from scm_lightning.checkpointing import load_checkpoint

    teacher = write_sd_teacher(tmp_path / "teacher")
    for i, setting in enumerate(["trainer.precision=64", "loss.jvp_precision=64"]):
        ckpt = fit_two_steps(
            tmp_path / f"run{i}", teacher, "data=text_pairs", f"data.path={pairs}",
            "data.val_size=16", setting,
        )  # fmt: skip
        assert load_checkpoint(ckpt)["global_step"] == 2, setting


def ema_samples(ckpt_path: Path, cond: TextCondition) -> dict[int, torch.Tensor]:
    """Our sampler's 1- and 2-step samples of 3 images from a checkpoint's EMA student (seed 0,
    guidance 1.5): what an export loaded by diffusers must reproduce."""
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_swapped, resolve_profile
    from scm_lightning.restore import rebuild_module

    ckpt = load_checkpoint(ckpt_path)
    module, _, _ = rebuild_module(ckpt, with_teacher=False)
    with ema_swapped(module, ckpt, resolve_profile(ckpt, None)):
        return {
            nfe: module.sample(
                3,
                nfe=nfe,
                generator=torch.Generator().manual_seed(0),
                class_labels=cond,
                guidance=1.5,
            )
            for nfe in (1, 2)
        }


# --- export -> diffusers -> sample with prompt embeddings and prompts ------------------------
LOAD_TEXT_SCRIPT = (
    LOAD_PIPELINE
    + r"""
from safetensors.torch import load_file, save_file

embeds = load_file(f"{out}/embeds.safetensors")["prompt_embeds"]
result = {}
for nfe in (1, 2):
    gen = torch.Generator().manual_seed(0)
    result[f"embeds{nfe}"] = pipe(
        num_inference_steps=nfe, prompt_embeds=embeds, guidance_scale=1.5, generator=gen,
        output_type="latent",
    ).images
gen = torch.Generator().manual_seed(0)
result["prompts2"] = pipe(
    num_inference_steps=2, prompt=PROMPTS, guidance_scale=1.5, generator=gen,
    output_type="latent",
).images
save_file(result, f"{out}/images.safetensors")
"""
)
PROMPTS = ["one digit", "two", "the zero of three"]


@pytest.mark.slow
def test_export_loads_in_diffusers_and_samples_with_prompt_embeds_and_prompts(
    pairs: Path, tmp_path: Path
) -> None:
    """A CFG-distilled text student (2 steps of `fit`) exported with the teacher folder's tiny
    CLIP text encoder: diffusers' loader (fresh process, no scm_lightning) samples with
    ``prompt_embeds`` exactly as our sampler does (1e-5), and with ``prompt=`` as with the
    prompts' embeddings computed here by transformers; `sample` from the checkpoint and from
    the export draw the same held-out prompts."""

    from safetensors.torch import load_file, save_file

    from conftest import fit_two_steps
    from scm_lightning import commands
    from scm_lightning.config import ConfigError
    from scm_lightning.pipeline import load_pipeline

    teacher = write_sd_teacher(tmp_path / "teacher", "v_prediction")
    write_tiny_text_encoder(teacher)
    ckpt_path = fit_two_steps(
        tmp_path / "run",
        teacher,
        "data=text_pairs",
        f"data.path={pairs}",
        "data.val_size=16",
        "student.guidance_embedding=true",
        "student.guidance_scale_range=[1,2]",
    )
    folder = tmp_path / "export"
    assert commands.main("export", [f"ckpt={ckpt_path}", f"out={folder}"]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["adapter"]["text_embed_dim"] == EMBED_DIM
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]

    embeds = clip_embeddings(teacher, PROMPTS)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    save_file({"prompt_embeds": embeds.contiguous()}, str(fresh / "embeds.safetensors"))
    script = LOAD_TEXT_SCRIPT.replace("PROMPTS", repr(PROMPTS))
    run_without_project(script, folder, fresh, cwd=fresh)
    got = load_file(str(fresh / "images.safetensors"))

    for nfe, ref in ema_samples(ckpt_path, TextCondition(embeds)).items():
        torch.testing.assert_close(got[f"embeds{nfe}"], ref, rtol=0, atol=1e-5)
        assert ref.abs().max() > 1e-2
    torch.testing.assert_close(got["prompts2"], got["embeds2"], rtol=0, atol=1e-5)
    assert (got["embeds2"][0] - got["embeds2"][1]).abs().max() > 1e-4  # prompts matter

    # the `sample` command: checkpoint and export draw the same held-out prompts
    for name, source in (("ckpt", ckpt_path), ("folder", folder)):
        argv = [f"ckpt={source}", f"out={tmp_path / name}", "nfe=2", "num=6", "guidance=1.5"]
        assert commands.main("sample", argv) == 0
    a, b = (np.load(tmp_path / n / "samples_nfe2_seed0.npz")["samples"] for n in ("ckpt", "folder"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    with pytest.raises(ConfigError, match="labels=3 given but the model is text-conditioned"):
        commands.main("sample", [f"ckpt={folder}", f"out={tmp_path / 'x'}", "labels=3"])
    # `evaluate` of the export: student on held-out prompts, the teacher guided at s = 1.5
    # with the null prompt (rebuilt from the run's teacher config and data)
    argv = [f"ckpt={folder}", f"out={tmp_path / 'eval'}", "num_samples=12", "batch_size=12",
            "nfes=[1]", "teacher_nfes=[2]", "teacher_grids=[edm]", "guidance=1.5",
            "kid_subsets=2", "kid_subset_size=6"]  # fmt: skip
    assert commands.main("evaluate", argv) == 0
    rows = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["results"]
    assert {(r["model"], r["nfe"]) for r in rows} == {("student", 1), ("teacher", 2)}
    assert all(math.isfinite(r["fd"]) for r in rows)

    # an export without a text encoder takes embeddings only
    plain = load_pipeline(folder)
    plain.text_encoder = plain.tokenizer = None
    with pytest.raises(ValueError, match="no text encoder and tokenizer"):
        plain(prompt="one digit", output_type="latent")
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(B, L, 12\)"):
        plain(prompt_embeds=torch.zeros(1, TOKENS, 7), output_type="latent")
    with pytest.raises(ValueError, match="text-conditioned: pass prompt_embeds"):
        plain(output_type="latent")


# --- errors before work ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_world(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("text_bad")
    return {
        "base": base,
        "teacher": write_sd_teacher(base / "teacher"),
        "wide_teacher": write_sd_teacher(base / "wide", cross_attention_dim=16),
        "pairs": write_text_pairs(base / "pairs", num=32),
        "pooled": write_text_pairs(base / "pooled", num=32, pooled=6),
    }


def _fit_argv(w: dict[str, Path], teacher: str | None, pairs: str | None, *extra: str):
    argv = ["fit", f"run_dir={w['base'] / 'run'}", "data.batch_size=8", "eval=none"]
    if teacher:
        argv += ["teacher=diffusers", f"teacher.path={w[teacher]}"]
    if pairs:
        argv += ["data=text_pairs", f"data.path={w[pairs]}", "data.val_size=8"]
    return [*argv, *extra]


GUIDANCE = [
    "student.guidance_embedding=true",
    "student.guidance_scale_range=[1,2]",
    "student.uncond_label=0",
]


def _case_extra(name: str) -> list[str]:
    """The overrides a case needs beyond teacher and data."""
    if name.startswith("guidance"):
        return GUIDANCE
    if name.startswith("latents"):
        return ["data.latents=true", "eval=digits"]
    return []


TEXT_CASES = [
    ("embedding_width", ("wide_teacher", "pairs"),
     ["prompt_embeds have width 12", "cross-attention takes 16"]),
    ("condition_missing", ("teacher", None),
     ["teacher is text-conditioned", "no prompt embeddings", "data=text_pairs"]),
    ("unconditional_teacher", (None, "pairs"),
     ["prompt embeddings (width 12)", "teacher is not text-conditioned"]),
    ("pooled_not_taken", ("teacher", "pooled"),
     ["UNet2DConditionModel takes no pooled embeddings"]),
    ("guidance_null_label_with_text", ("teacher", "pairs"),
     ["student.uncond_label=0", "null with data=text_pairs"]),
    ("latents_to_a_feature_network", ("teacher", "pairs"),
     ["callbacks.fid is set with data.latents=true", "callbacks.fid=null"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "where", "expected"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_errors_are_refused_before_work(bad_world, name, where, expected) -> None:
    """The real `fit` path in-process (validation, data, teacher, checks): a ConfigError naming
    the problem before the module is built, and no run folder written."""
    import re

    from scm_lightning.config import ConfigError, compose_config
    from scm_lightning.training import run

    teacher, pairs = where
    argv = _fit_argv(bad_world, teacher, pairs, *_case_extra(name))
    with pytest.raises(ConfigError, match=".*".join(re.escape(p) for p in expected)):
        run(compose_config("fit", argv[1:]))
    assert not (bad_world["base"] / "run").exists()


@pytest.mark.slow
def test_text_errors_exit_2_with_one_line_from_the_cli(bad_world) -> None:
    """Through the CLI: exit 2, one ``error: ...`` line, no traceback, nothing written (a
    teacher/data check after loading both, and a config check before Lightning is imported)."""
    from concurrent.futures import ThreadPoolExecutor

    by_name = {case[0]: case for case in TEXT_CASES}
    cases = [by_name["embedding_width"], by_name["guidance_null_label_with_text"]]

    def one(case):
        name, (teacher, pairs), _ = case
        argv = _fit_argv(bad_world, teacher, pairs, *_case_extra(name))
        return run_cli(*argv, cwd=bad_world["base"])

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, cases))
    for (name, _, expected), res in zip(cases, results, strict=True):
        assert res.returncode == 2, (name, res.stderr[-3000:])
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error")]
        assert len(errors) == 1 and "Traceback" not in res.stderr, (name, res.stderr)
        for part in expected:
            assert part in errors[0], (name, part, errors[0])
    assert not (bad_world["base"] / "run").exists()
    assert not (bad_world["base"] / "runs").exists()


# --- Flow-matching transformer teachers (Sana, SD3) and JVP attention for cross-attention ---
# Tiny random models (no downloads); references are independent: forward-mode AD through
# explicit math attention, diffusers' own FlowMatchEulerDiscreteScheduler.step, and
# SanaSprintPipeline's flow -> TrigFlow conversion written out from its source.

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SIGMA_DATA = 0.5


def _close(a, b, tol):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def math_attention(q, k, v, mask=None):
    """Independent reference: explicit softmax(q kᵀ/√d + bias) v (bool mask: False = -inf)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        boolean = mask.dtype == torch.bool
        scores = scores.masked_fill(~mask, -math.inf) if boolean else scores + mask
    return torch.softmax(scores, dim=-1) @ v


def _masks(b, h, lq, lk, dtype):
    """Key padding as bool (B, 1, 1, Lk) with the first 8 keys of row 0 masked (a whole key
    tile at block 8), diffusers' additive -10000 bias (B, H, 1, Lk), a full (B, 1, Lq, Lk)
    bool mask (no row fully masked)."""
    g = torch.Generator().manual_seed(3)
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[0, ..., :8] = False
    keep[1, ..., lk - 5 :] = False
    bias = torch.zeros(b, h, 1, lk, dtype=dtype)
    bias[0, :, :, lk // 2 :] = -10000.0
    full = torch.rand(b, 1, lq, lk, generator=g) > 0.4
    full[..., 0] = True
    return {"key_padding_bool": keep, "diffusers_bias": bias, "full_bool": full}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", ["key_padding_bool", "diffusers_bias", "full_bool"])
def test_masked_cross_attention_jvp_matches_math(dtype, mask_kind):
    b, h, lq, lk, d, dv = 2, 3, 21, 29, 8, 12  # cross-attention: Lq != Lk, D != Dv
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    primals = (mk(b, h, lq, d), mk(b, h, lk, d), mk(b, h, lk, dv))
    tangents = tuple(mk(*p.shape) for p in primals)
    mask = _masks(b, h, lq, lk, dtype)[mask_kind]
    y_ref, ty_ref = torch.func.jvp(lambda *a: math_attention(*a, mask), primals, tangents)
    y, ty = torch.func.jvp(
        lambda *a: jvp_attention(*a, block_size=8, attn_mask=mask), primals, tangents
    )
    _close(y, y_ref, TOL[dtype])
    _close(ty, ty_ref, TOL[dtype])
    y2, ty2 = attention_with_tangent(*primals, *tangents, block_size=(4, 8), attn_mask=mask)
    _close(y2, y_ref, TOL[dtype])
    _close(ty2, ty_ref, TOL[dtype])
    # Backward (fused SDPA recomputed with the mask) against autograd through the math path.
    leaves = [p.clone().requires_grad_() for p in primals]
    jvp_attention(*leaves, attn_mask=mask).square().sum().backward()
    ref = [p.clone().requires_grad_() for p in primals]
    math_attention(*ref, mask).square().sum().backward()
    for a, r in zip(leaves, ref, strict=True):
        _close(a.grad, r.grad, TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_jvp_attention_in_half_precision(dtype):
    """Half inputs with diffusers' -10000 bias (cast to the half dtype): fp32 accumulation keeps
    output and tangent within half-precision error of the float64 reference."""
    b, h, lq, lk, d = 2, 2, 17, 23, 16
    g = torch.Generator().manual_seed(0)
    p64 = tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    t64 = tuple(torch.randn_like(p) for p in p64)
    bias = _masks(b, h, lq, lk, torch.float64)["diffusers_bias"]
    y, ty = torch.func.jvp(
        lambda *a: jvp_attention(*a, block_size=8, attn_mask=bias.to(dtype)),
        tuple(p.to(dtype) for p in p64),
        tuple(t.to(dtype) for t in t64),
    )
    assert y.dtype == ty.dtype == dtype
    # Reference on the half-rounded inputs, in float64.
    rounded = tuple(p.to(dtype).double() for p in p64)
    y_ref, ty_ref = torch.func.jvp(
        lambda *a: math_attention(*a, bias.to(dtype).double()),
        rounded,
        tuple(t.to(dtype).double() for t in t64),
    )
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    assert (y.double() - y_ref).abs().max() <= tol
    assert (ty.double() - ty_ref).abs().max() <= tol


def test_mask_shape_errors_and_no_mask_tangent():
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 5\)"):
        jvp_attention(q, k, k, attn_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or floating"):
        jvp_attention(q, k, k, attn_mask=torch.ones(2, 1, 1, 7, dtype=torch.long))
    bias = torch.zeros(2, 1, 1, 7, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="mask carries no tangent"):
        torch.func.jvp(
            lambda m: jvp_attention(q, k, k, attn_mask=m), (bias,), (torch.ones_like(bias),)
        )


def test_key_padding_mask_never_materialises_the_score_matrix():
    """With a (B, 1, 1, Lk) key-padding mask, no tensor of size Lq×Lk per (batch, head)
    appears: neither in the fused primal nor in the tiled tangent (the bias is cut per tile)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _ShapeRecorder(TorchDispatchMode):
        """Elements of storage each op's outputs hold (a broadcast view holds its base's)."""

        def __init__(self):
            super().__init__()
            self.numels: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    size = t.untyped_storage().nbytes() // t.element_size()
                    self.numels.append((str(func), size))
            return out

    b, h, lq, lk, d, bq, bk = 1, 2, 96, 80, 8, 32, 16
    g = torch.Generator().manual_seed(0)
    primals = tuple(torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    tangents = tuple(torch.randn_like(p) for p in primals)
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[..., 60:] = False
    with _ShapeRecorder() as rec:
        torch.func.jvp(
            lambda *a: jvp_attention(*a, block_size=(bq, bk), attn_mask=keep), primals, tangents
        )
    bound = b * h * max(bq * bk, max(lq, lk) * 2 * d)
    worst = max(rec.numels, key=lambda x: x[1])
    assert worst[1] <= bound < b * h * lq * lk, worst
    with _ShapeRecorder() as rec_math:  # the recorder does see the math path's matrix
        torch.func.jvp(lambda *a: math_attention(*a, keep), primals, tangents)
    assert max(n for _, n in rec_math.numels) >= b * h * lq * lk


def test_per_query_masks_take_the_torch_loop_where_triton_would_run(monkeypatch):
    """The Triton kernel takes key padding only; a (Lq, Lk) mask goes to the torch loop even
    where Triton is available (forced on here: the kernel itself would refuse CPU tensors)."""
    import scm_lightning.jvp.attention as attention

    monkeypatch.setattr(attention, "_triton_ok", lambda q: True)
    b, h, lq, lk, d = 2, 2, 9, 11, 4
    g = torch.Generator().manual_seed(0)
    primals = tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    tangents = tuple(torch.randn_like(p) for p in primals)
    mask = _masks(b, h, lq, lk, torch.float64)["full_bool"]
    y, ty = torch.func.jvp(lambda *a: jvp_attention(*a, attn_mask=mask), primals, tangents)
    y_ref, ty_ref = torch.func.jvp(lambda *a: math_attention(*a, mask), primals, tangents)
    _close(y, y_ref, 1e-12)
    _close(ty, ty_ref, 1e-12)


_TRITON_CHILD = textwrap.dedent(
    """
    import json, math, os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from scm_lightning.jvp.attention import mask_to_bias
    from scm_lightning.jvp.triton_attention import triton_attention_with_tangent

    def math_attention(q, k, v, bias):
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, -1) @ v

    g = torch.Generator().manual_seed(0)
    b, h, lq, lk, d = 2, 2, 37, 70, 16
    p = [torch.randn(*s, generator=g) for s in [(b, h, lq, d), (b, h, lk, d), (b, h, lk, d)]]
    t = [torch.randn(*x.shape, generator=g) for x in p]
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[0, ..., :32] = False  # two whole key tiles of 16 masked before the first valid key
    keep[1, ..., 50:] = False
    out = {}
    for name, mask in {"bool": keep, "bias": (~keep).float() * -10000.0}.items():
        bias = mask_to_bias(mask, p[0], p[1])
        y, ty = triton_attention_with_tangent(*p, *t, block_m=16, block_n=16, bias=bias)
        yr, tyr = torch.func.jvp(
            lambda *a: math_attention(*a, bias.double()),
            tuple(x.double() for x in p), tuple(x.double() for x in t))
        out[name] = [(y.double() - yr).abs().max().item(), (ty.double() - tyr).abs().max().item()]
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_key_padding_matches_math():
    """The Triton kernel's key bias (interpreter on CPU, in a child process: see
    tests/test_triton_attention.py), incl. query rows whose first key tiles are all masked."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    for name, (err_y, err_ty) in json.loads(line[len("RESULT") :]).items():
        assert err_y <= 1e-5 and err_ty <= 1e-5, (name, err_y, err_ty)


# --- tiny diffusers models --------------------------------------------------------------------


def tiny_sana(**overrides):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        patch_size=2,
        mlp_ratio=2.0,
    )
    cfg.update(overrides)
    return SanaTransformer2DModel(**cfg)


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=6,
        out_channels=4,
        pos_embed_max_size=16,
    )


def _condition(batch=2, length=5, width=12, pooled=None, dtype=torch.float64, mask=True):
    g = torch.Generator().manual_seed(7)
    embeds = torch.randn(batch, length, width, generator=g, dtype=dtype)
    attention_mask = None
    if mask:
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        attention_mask[0, 3:] = 0  # padded prompt
    pooled_embeds = None if pooled is None else torch.randn(batch, pooled, dtype=dtype)
    return TextCondition(embeds, pooled_embeds, attention_mask)


def test_sana_install_replaces_cross_attention_and_leaves_linear_attention():
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    from scm_lightning.jvp.install import JVPAttnProcessor

    model = tiny_sana().double()
    cond = _condition()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ts = torch.tensor([30.0, 800.0], dtype=torch.float64)

    def f(a, e):
        return model(
            a, encoder_hidden_states=e, timestep=ts, encoder_attention_mask=cond.attention_mask
        ).sample

    tangents = (torch.randn_like(x), torch.randn_like(cond.prompt_embeds))
    with sdpa_kernel(SDPBackend.MATH):
        y_ref, ty_ref = torch.func.jvp(f, (x, cond.prompt_embeds), tangents)
    keys = list(model.state_dict())
    assert install_jvp_attention(model, block_size=(16, 4)) == 2  # the two attn2
    assert list(model.state_dict()) == keys
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, SanaLinearAttnProcessor2_0)
        assert isinstance(block.attn2.processor, JVPAttnProcessor)
        assert block.attn2.processor.norm_before_split
    y, ty = torch.func.jvp(f, (x, cond.prompt_embeds), tangents)
    _close(y, y_ref, 1e-12)
    _close(ty, ty_ref, 1e-12)
    # The mask matters (the check above would not notice a dropped mask otherwise).
    y_nomask = model(x, encoder_hidden_states=cond.prompt_embeds, timestep=ts).sample
    assert (y_nomask - y).abs().max() > 1e-3


def test_sana_qk_norm_processor_matches_sana_processor():
    """Sana's processor normalises q/k before the head split (rms_norm_across_heads)."""
    model = tiny_sana(qk_norm="rms_norm_across_heads").double()
    cond = _condition()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ts = torch.tensor([30.0, 800.0], dtype=torch.float64)
    kw = dict(encoder_attention_mask=cond.attention_mask, timestep=ts)
    with sdpa_kernel(SDPBackend.MATH):
        ref = model(x, encoder_hidden_states=cond.prompt_embeds, **kw).sample
    install_jvp_attention(model)
    _close(model(x, encoder_hidden_states=cond.prompt_embeds, **kw).sample, ref, 1e-12)


def test_sd3_joint_attention_jvp_matches_math():
    model = tiny_sd3().double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    enc = torch.randn(2, 5, 12, dtype=torch.float64)
    pooled = torch.randn(2, 6, dtype=torch.float64)
    ts = torch.tensor([30.0, 800.0], dtype=torch.float64)

    def f(a, e):
        return model(a, encoder_hidden_states=e, pooled_projections=pooled, timestep=ts).sample

    tangents = (torch.randn_like(x), torch.randn_like(enc))
    with sdpa_kernel(SDPBackend.MATH):
        y_ref, ty_ref = torch.func.jvp(f, (x, enc), tangents)
    assert install_jvp_attention(model, block_size=8) == 2
    y, ty = torch.func.jvp(f, (x, enc), tangents)
    _close(y, y_ref, 1e-12)
    _close(ty, ty_ref, 1e-12)


def test_unet2d_condition_cross_attention_with_encoder_mask():
    from test_attention_jvp import cross_attention_unet

    model = cross_attention_unet()
    cond = _condition()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([3.0, 700.0], dtype=torch.float64)

    def f(a, e):
        return model(a, t, e, encoder_attention_mask=cond.attention_mask).sample

    tangents = (torch.randn_like(x), torch.randn_like(cond.prompt_embeds))
    with sdpa_kernel(SDPBackend.MATH):
        y_ref, ty_ref = torch.func.jvp(f, (x, cond.prompt_embeds), tangents)
    assert install_jvp_attention(model) == 8  # attn1 + attn2 in 4 transformer blocks
    y, ty = torch.func.jvp(f, (x, cond.prompt_embeds), tangents)
    _close(y, y_ref, 1e-12)
    _close(ty, ty_ref, 1e-12)


def test_unsupported_processor_is_one_line_naming_the_class():
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    model = tiny_sana()
    model.transformer_blocks[1].attn2.set_processor(FusedAttnProcessor2_0())
    with pytest.raises(ValueError) as err:
        install_jvp_attention(model)
    msg = str(err.value)
    assert "\n" not in msg
    assert "transformer_blocks.1.attn2" in msg and "FusedAttnProcessor2_0" in msg
    assert "SanaAttnProcessor2_0" in msg and "SanaLinearAttnProcessor2_0" in msg
    # Nothing patched: the check runs over every module before any swap.
    assert type(model.transformer_blocks[0].attn2.processor).__name__ == "SanaAttnProcessor2_0"


def test_attention_module_mixin_models_are_refused_in_one_line():
    """diffusers' newer attention classes (Flux) run fused kernels inside their own processors."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=6,
        axes_dims_rope=(2, 2, 4),
    )
    with pytest.raises(TypeError) as err:
        install_jvp_attention(model)
    msg = str(err.value)
    assert "\n" not in msg
    assert "FluxAttention" in msg and "FluxAttnProcessor" in msg and "supported:" in msg


# --- Sana teacher through load_teacher ----------------------------------------------------------


def save_sana_folder(path: Path, num_train_timesteps: int = 1000, **overrides) -> Path:
    """A local diffusers pipeline-style folder: transformer/ + scheduler/ (flow matching)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tiny_sana(**overrides).save_pretrained(path / "transformer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=3.0).save_config(
        path / "scheduler"
    )
    return path


def _load(path, **kw):
    from scm_lightning.teachers.loading import load_teacher

    return load_teacher(path, sigma_data=SIGMA_DATA, **kw).double()


def test_sana_adapter_step_equals_flow_match_euler_scheduler(tmp_path):
    """A TrigFlow DDIM step of the adapter is the scheduler's Euler step, mapped to flow space:
    x_s = (1 − s)·x_t/cos t with σ_d·tan t = s/(1 − s)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from scm_lightning.teachers.schedule import FlowSchedule, ScheduleAdapter

    teacher = _load(save_sana_folder(tmp_path / "sana"))
    assert isinstance(teacher, ScheduleAdapter) and isinstance(teacher.schedule, FlowSchedule)
    assert teacher.schedule.num_train_timesteps == 1000.0
    assert teacher.text_embed_dim == 12 and teacher.in_channels == 4
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "sana" / "scheduler")
    scheduler.set_timesteps(5)
    cond = _condition()
    net = teacher.net
    g = torch.Generator().manual_seed(1)
    for i in (1, 2, 3):  # sigmas[0] = 1 is pure noise (no finite t)
        s, s_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        t, t_next = (math.atan(v / ((1 - v) * SIGMA_DATA)) for v in (s, s_next))
        x_t = SIGMA_DATA * torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        x_s = (1 - s) * x_t / math.cos(t)
        v = net(
            x_s,
            encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.attention_mask,
            timestep=scheduler.timesteps[i].double().expand(2),
        ).sample
        scheduler._step_index = i
        x_s_next = scheduler.step(v, scheduler.timesteps[i], x_s).prev_sample
        F = teacher(x_t / SIGMA_DATA, torch.full((2,), t, dtype=torch.float64), cond)
        x_t_next = math.cos(t - t_next) * x_t - math.sin(t - t_next) * SIGMA_DATA * F
        # The scheduler steps in float32 (its sigmas and step() upcast): fp32 tolerance.
        _close((1 - s_next) * x_t_next / math.cos(t_next), x_s_next, 1e-6)


def sprint_F(net, x_scaled, t, cond, guidance=None):
    """SanaSprintPipeline's TrigFlow output (diffusers/pipelines/sana/pipeline_sana_sprint.py,
    the denoising loop), written out: ``s = sin t/(cos t + sin t)``, input
    ``x_t/σ_d·√(s² + (1−s)²)``, timestep ``s``, output
    ``((1−2s)·x + (1−2s+2s²)·v)/√(s² + (1−s)²)``."""
    s = (torch.sin(t) / (torch.cos(t) + torch.sin(t))).view(-1, 1, 1, 1)
    norm = torch.sqrt(s**2 + (1 - s) ** 2)
    x_in = x_scaled * norm
    kw = {} if guidance is None else {"guidance": guidance}
    v = net(
        x_in,
        encoder_hidden_states=cond.prompt_embeds,
        encoder_attention_mask=cond.attention_mask,
        timestep=s.flatten(),
        **kw,
    ).sample
    return ((1 - 2 * s) * x_in + (1 - 2 * s + 2 * s**2) * v) / norm


def test_flow_adapter_equals_sana_sprint_conversion_only_for_unit_timesteps(tmp_path):
    """Our flow adapter (data_scale = 1/σ_d, the net's timestep s·N·timestep_scale) is
    SanaSprintPipeline's conversion exactly when N·timestep_scale = 1: Sprint feeds the net s.
    A stock Sana teacher (N = 1000, timestep_scale = 1) does not satisfy it."""
    cond = _condition()
    t = torch.tensor([0.2, 1.1], dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    unit = _load(
        save_sana_folder(tmp_path / "unit", timestep_scale=1e-3), data_scale=1 / SIGMA_DATA
    )
    assert unit.schedule.num_train_timesteps == pytest.approx(1.0)
    _close(unit(x, t, cond), sprint_F(unit.net, x, t, cond), 1e-10)
    stock = _load(save_sana_folder(tmp_path / "stock"), data_scale=1 / SIGMA_DATA)
    assert (stock(x, t, cond) - sprint_F(stock.net, x, t, cond)).abs().max() > 1e-3


def test_stock_sana_sprint_pipeline_samples_as_our_consistency_sampler(tmp_path):
    """Pipeline level: diffusers' own SanaSprintPipeline (SCMScheduler, its flow conversion,
    guidance × guidance_embeds_scale) on a Sana with guidance_embeds and unit timesteps equals
    our consistency sampler on our flow adapter (data_scale = 1/σ_d), 1 and 2 steps, same
    noise. Sana's native guidance input is switched on for this check only: our CFG students
    carry the zero-initialised GuidanceEmbedding instead, so they export through pipeline_scm."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    from scm_lightning.sampling import consistency_sample

    folder = save_sana_folder(tmp_path / "s", guidance_embeds=True, timestep_scale=1e-3)
    adapter = _load(folder, data_scale=1 / SIGMA_DATA).float()
    adapter.net.supports_guidance_input = True  # route guidance= to Sana's guidance embedder
    pipe = SanaSprintPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=adapter.net,
        scheduler=SCMScheduler(sigma_data=SIGMA_DATA),
    )
    pipe.set_progress_bar_config(disable=True)
    cond = _condition(dtype=torch.float32)
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    guidance = torch.full((2,), 4.5 * adapter.net.config.guidance_embeds_scale)
    for times in ([1.5], [1.5, 1.3]):
        got = pipe(
            prompt_embeds=cond.prompt_embeds,
            prompt_attention_mask=cond.attention_mask,
            num_inference_steps=len(times),
            max_timesteps=times[0],
            intermediate_timesteps=times[1] if len(times) == 2 else None,
            guidance_scale=4.5,
            latents=eps.clone(),
            height=256,  # 8×8 latents at the pipeline's default VAE factor 32 (no VAE here)
            width=256,
            use_resolution_binning=False,
            generator=torch.Generator().manual_seed(5),
            output_type="latent",  # x̂0/σ_d
        ).images
        ref = consistency_sample(
            adapter,
            SIGMA_DATA * eps,
            times,
            SIGMA_DATA,
            cond,
            guidance,
            torch.Generator().manual_seed(5),
        )
        torch.testing.assert_close(got, ref / SIGMA_DATA, rtol=0, atol=1e-5)
        assert ref.abs().max() > 1e-1


def test_sana_student_equals_teacher_at_init_and_jvp_attention_is_exact(tmp_path):
    from scm_lightning.student import Student

    teacher = _load(save_sana_folder(tmp_path / "sana"))
    student = Student.from_teacher(teacher).double()
    cond = _condition()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for t in (0.05, 0.8, 1.5):
        tt = torch.full((2,), t, dtype=torch.float64)
        _close(student(x, tt, cond), teacher(x, tt, cond), 1e-12)
    # The student's JVP in (x, t) with JVP attention installed equals the math backend's.
    tt = torch.tensor([0.3, 1.2], dtype=torch.float64)
    tangents = (torch.randn_like(x), torch.ones_like(tt))
    f = lambda a, b: student(a, b, cond)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(f, (x, tt), tangents)
    assert install_jvp_attention(student) == 2
    out = torch.func.jvp(f, (x, tt), tangents)
    _close(out[0], ref[0], 1e-12)
    _close(out[1], ref[1], 1e-12)


# --- end to end from the CLI (needs wip-text's text_pairs data module) ---------------------------

_HAS_TEXT_PAIRS = (Path(__file__).parents[1] / "conf" / "data" / "text_pairs.yaml").is_file()


def write_masked_text_pairs(
    folder: Path, n: int = 48, length: int = 5, width: int = 12, channels: int = 4
) -> Path:
    """The agreed text_pairs layout: shards with images/prompt_embeds/attention_mask, plus
    null.safetensors (the empty prompt)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, 3:] = 0
    save_file(
        {
            "images": torch.rand(n, channels, 8, 8, generator=g) * 2 - 1,
            "prompt_embeds": torch.randn(n, length, width, generator=g),
            "attention_mask": mask,
        },
        str(folder / "shard_000.safetensors"),
    )
    null_mask = torch.zeros(1, length, dtype=torch.long)
    null_mask[0, 0] = 1
    save_file(
        {
            "prompt_embeds": torch.zeros(1, length, width),
            "attention_mask": null_mask,
        },
        str(folder / "null.safetensors"),
    )
    return folder


@pytest.mark.slow
@pytest.mark.skipif(
    not _HAS_TEXT_PAIRS, reason="data=text_pairs comes with wip-text (passes once merged)"
)
def test_fit_debug_sana_teacher_from_the_cli(tmp_path):
    # One channel at 8×8: debug=fdr's evaluation scores with the bundled digits classifier.
    teacher = save_sana_folder(tmp_path / "sana", in_channels=1, out_channels=1)
    data = write_masked_text_pairs(tmp_path / "pairs", channels=1)
    res = run_cli(
        "fit",
        "debug=fdr",
        "data=text_pairs",
        f"data.path={data}",
        "data.val_size=16",
        "data.batch_size=8",
        f"teacher.path={teacher}",
        f"run_dir={tmp_path / 'run'}",
        "eval.teacher_nfes=[2]",  # one teacher row: the student's rows are what this checks
        "eval.teacher_grids=[edm]",
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert "fd_teacher_nfe2=" in last and "fd_student_nfe2=" in last, last


def test_sd3_teacher_x0_equals_flow_closed_form(tmp_path):
    """SD3 (pooled_projections, no mask) through load_teacher: the adapter's x̂0 = cos t·x_t −
    sin t·σ_d·F equals the flow closed form x_s − s·v at the matched s, x_s = (1 − s)·x_t/cos t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from scm_lightning.student import Student

    tiny_sd3().save_pretrained(tmp_path / "sd3" / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path / "sd3" / "scheduler")
    teacher = _load(tmp_path / "sd3")
    cond = _condition(pooled=6, mask=False)
    t = torch.tensor([0.3, 1.1], dtype=torch.float64)
    x_t = SIGMA_DATA * torch.randn(2, 4, 8, 8, dtype=torch.float64)
    F = teacher(x_t / SIGMA_DATA, t, cond)
    s = SIGMA_DATA * torch.tan(t) / (1 + SIGMA_DATA * torch.tan(t))
    x_s = ((1 - s) / torch.cos(t)).view(-1, 1, 1, 1) * x_t
    v = teacher.net(
        x_s,
        encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled_prompt_embeds,
        timestep=s * 1000,
    ).sample
    c, sn = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    _close(c * x_t - sn * SIGMA_DATA * F, x_s - s.view(-1, 1, 1, 1) * v, 1e-10)
    student = Student.from_teacher(teacher).double()
    _close(student(x_t / SIGMA_DATA, t, cond), F, 1e-12)


# --- export -> diffusers (fresh process) -> sample ----------------------------------------------
LOAD_SANA_SCRIPT = (
    LOAD_PIPELINE
    + r"""
from safetensors.torch import load_file, save_file

cond = load_file(f"{out}/cond.safetensors")
result = {}
for nfe in (1, 2):
    result[f"nfe{nfe}"] = pipe(
        num_inference_steps=nfe, prompt_embeds=cond["prompt_embeds"],
        prompt_attention_mask=cond["attention_mask"], guidance_scale=1.5,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).images
save_file(result, f"{out}/images.safetensors")
"""
)


@pytest.mark.slow
def test_sana_student_export_samples_in_diffusers_as_our_sampler(tmp_path):
    """A CFG-distilled student of a Sana teacher (guidance embedding on Sana's timestep
    embedder; 2 training steps with JVP attention on the masked cross-attention) exports
    through pipeline_scm.py; diffusers' loader in a fresh process (no scm_lightning) samples
    with prompt_embeds + prompt_attention_mask as our sampler does (1e-5)."""
    from safetensors.torch import load_file, save_file

    from conftest import fit_two_steps
    from scm_lightning import commands

    teacher = save_sana_folder(tmp_path / "sana")
    data = write_masked_text_pairs(tmp_path / "pairs")
    ckpt_path = fit_two_steps(
        tmp_path / "run",
        teacher,
        "data=text_pairs",
        f"data.path={data}",
        "data.val_size=16",
        "student.guidance_embedding=true",
        "student.guidance_scale_range=[1,2]",
    )
    folder = tmp_path / "export"
    assert commands.main("export", [f"ckpt={ckpt_path}", f"out={folder}"]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["adapter"]["net_class"] == "SanaTransformer2DModel"
    assert index["adapter"]["kind"] == "flow"

    cond = _condition(batch=3, dtype=torch.float32)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    save_file(
        {"prompt_embeds": cond.prompt_embeds, "attention_mask": cond.attention_mask},
        str(fresh / "cond.safetensors"),
    )
    run_without_project(LOAD_SANA_SCRIPT, folder, fresh, cwd=fresh)
    got = load_file(str(fresh / "images.safetensors"))

    for nfe, ref in ema_samples(ckpt_path, cond).items():
        torch.testing.assert_close(got[f"nfe{nfe}"], ref, rtol=0, atol=1e-5)
        assert ref.abs().max() > 1e-2


@pytest.mark.slow
def test_sd3_student_with_pooled_embeddings_exports_and_samples_as_our_sampler(tmp_path):
    """SD3 end to end: text pairs with pooled embeddings and no mask, CFG distillation (guidance
    embedding on SD3's time_text_embed, JVP attention on joint attention), export, and the
    exported pipeline (loaded here; the fresh-process load is the Sana test's) samples with
    prompt_embeds + pooled_prompt_embeds as our sampler does."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    from conftest import fit_two_steps
    from scm_lightning import commands
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_swapped, resolve_profile
    from scm_lightning.pipeline import load_pipeline
    from scm_lightning.restore import rebuild_module

    tiny_sd3().save_pretrained(tmp_path / "sd3" / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path / "sd3" / "scheduler")
    data = tmp_path / "pairs"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "images": torch.rand(48, 4, 8, 8, generator=g) * 2 - 1,
            "prompt_embeds": torch.randn(48, 5, 12, generator=g),
            "pooled_prompt_embeds": torch.randn(48, 6, generator=g),
        },
        str(data / "shard_000.safetensors"),
    )
    save_file(
        {"prompt_embeds": torch.zeros(1, 5, 12), "pooled_prompt_embeds": torch.zeros(1, 6)},
        str(data / "null.safetensors"),
    )
    ckpt_path = fit_two_steps(
        tmp_path / "run",
        tmp_path / "sd3",
        "data=text_pairs",
        f"data.path={data}",
        "data.val_size=16",
        "student.guidance_embedding=true",
        "student.guidance_scale_range=[1,2]",
    )
    folder = tmp_path / "export"
    assert commands.main("export", [f"ckpt={ckpt_path}", f"out={folder}"]) == 0
    pipe = load_pipeline(folder)
    cond = _condition(batch=3, dtype=torch.float32, pooled=6, mask=False)
    cond = TextCondition(cond.prompt_embeds, cond.pooled_prompt_embeds.float())
    ckpt = load_checkpoint(ckpt_path)
    module, _, _ = rebuild_module(ckpt, with_teacher=False)
    for nfe in (1, 2):
        got = pipe(
            num_inference_steps=nfe,
            prompt_embeds=cond.prompt_embeds,
            pooled_prompt_embeds=cond.pooled_prompt_embeds,
            guidance_scale=1.5,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images
        with ema_swapped(module, ckpt, resolve_profile(ckpt, None)):
            ref = module.sample(
                3,
                nfe=nfe,
                generator=torch.Generator().manual_seed(0),
                class_labels=cond,
                guidance=1.5,
            )
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        assert ref.abs().max() > 1e-2
