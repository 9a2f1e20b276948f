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

import numpy as np
import pytest
import torch

from conftest import run_cli
from scm_lightning.teachers.conditioning import TextCondition

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


# --- export -> diffusers -> sample with prompt embeddings and prompts ------------------------
LOAD_TEXT_SCRIPT = r"""
import importlib.abc, sys

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "scm_lightning" or name.startswith("scm_lightning."):
            raise ImportError("scm_lightning must not be needed to load an export")
        return None

sys.meta_path.insert(0, NoProject())
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

folder, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, low_cpu_mem_usage=False)
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
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from conftest import fit_two_steps
    from scm_lightning import commands
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.config import ConfigError
    from scm_lightning.export import ema_swapped, resolve_profile
    from scm_lightning.pipeline import load_pipeline
    from scm_lightning.restore import rebuild_module
    from test_diffusers_load import fresh_process_env

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
    script = fresh / "load.py"
    script.write_text(LOAD_TEXT_SCRIPT.replace("PROMPTS", repr(PROMPTS)))
    res = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(fresh)],
        env=fresh_process_env(fresh),
        cwd=fresh,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = load_file(str(fresh / "images.safetensors"))

    ckpt = load_checkpoint(ckpt_path)
    module, _, _ = rebuild_module(ckpt, with_teacher=False)
    with ema_swapped(module, ckpt, resolve_profile(ckpt, None)):
        for nfe in (1, 2):
            ref = module.sample(
                3,
                nfe=nfe,
                generator=torch.Generator().manual_seed(0),
                class_labels=TextCondition(embeds),
                guidance=1.5,
            )
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
