"""Latent teachers (``data.latent``): per-channel standardisation, the encoded-latent cache,
decoding on every image path, export with the VAE, and the errors before any work.

Tiny random AutoencoderKL and TrigFlowUNet folders are written in the tests (no downloads);
the CLI run uses the bundled digits VAE and latent teacher (``experiment=digits_latent_scd``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import fit_two_steps, run_cli
from scm_lightning.latents import (
    LatentCodec,
    channel_statistics,
    standardise,
    unstandardise,
    vae_fingerprint,
)


def write_tiny_vae(path: Path, latent_channels: int = 4, sample_size: int = 32, seed: int = 0):
    """A random AutoencoderKL folder: 1×32×32 images <-> latent_channels×8×8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=sample_size,
    )
    vae.save_pretrained(path)
    return path


def write_tiny_latent_teacher(path: Path, channels: int = 4, size: int = 8, seed: int = 0) -> Path:
    """A random TrigFlowUNet teacher on ``channels``×``size``² latents (unet/ + scheduler/)."""
    from diffusers import SCMScheduler

    from scm_lightning.nets.trigflow_unet import TrigFlowUNet

    torch.manual_seed(seed)
    net = TrigFlowUNet(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_channels=(16, 32),
        attention_head_dim=16,
    )
    for p in net.parameters():  # non-trivial (the default init outputs zeros)
        p.data.normal_(std=0.05)
    net.save_pretrained(path / "unet")
    SCMScheduler(sigma_data=0.5).save_config(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def latent_world(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("latent")
    return {
        "base": base,
        "vae": write_tiny_vae(base / "vae"),
        "vae2": write_tiny_vae(base / "vae2", latent_channels=2),
        "teacher": write_tiny_latent_teacher(base / "teacher"),
    }


# --- the per-channel standardisation (closed form, float64) ---------------------------------
def test_channel_statistics_and_standardisation_closed_form() -> None:
    """Latents built as μ_c + s_c·u with u exactly zero-mean, unit-std per channel: the measured
    statistics are (μ_c, s_c), standardised latents have mean 0 and std σ_d in every channel,
    and unstandardise inverts it, all to float64 round-off."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(64, 3, 5, 5, generator=gen, dtype=torch.float64)
    flat = u.transpose(0, 1).reshape(3, -1)
    u = (u - flat.mean(1).view(1, 3, 1, 1)) / flat.std(1, unbiased=False).view(1, 3, 1, 1)
    mu = torch.tensor([0.7, -2.0, 0.05], dtype=torch.float64)
    s = torch.tensor([3.0, 0.25, 1.5], dtype=torch.float64)
    raw = mu.view(1, 3, 1, 1) + s.view(1, 3, 1, 1) * u
    mean, std = channel_statistics(raw)
    torch.testing.assert_close(mean, mu, rtol=0, atol=1e-13)
    torch.testing.assert_close(std, s, rtol=1e-13, atol=0)
    sigma_data = 0.5
    z = standardise(raw, mean, std, sigma_data)
    torch.testing.assert_close(z, sigma_data * u, rtol=0, atol=1e-13)  # z = σ_d (ℓ − μ)/s
    zm, zs = channel_statistics(z)
    torch.testing.assert_close(zm, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(zs, torch.full((3,), sigma_data, dtype=torch.float64))
    torch.testing.assert_close(unstandardise(z, mean, std, sigma_data), raw, rtol=0, atol=1e-13)


def test_codec_refuses_to_decode_without_statistics(latent_world) -> None:
    from scm_lightning.latents import load_vae

    codec = LatentCodec(load_vae(latent_world["vae"]), 0.5)
    assert not codec.has_statistics
    with pytest.raises(RuntimeError, match="latent statistics are not set"):
        codec.decode(torch.zeros(1, 4, 8, 8))


# --- the data module: encode once, cache, statistics measured on the data --------------------
def test_latent_datamodule_statistics_cache_and_pixel_reference(latent_world, tmp_path) -> None:
    from scm_lightning.data.digits import DigitsDataModule
    from scm_lightning.data.latent import LatentDataModule

    cache = tmp_path / "cache"

    def make(vae: Path) -> LatentDataModule:
        images = DigitsDataModule(batch_size=8, resolution=32, conditional=True)
        return LatentDataModule(images, str(vae), sigma_data=0.5, cache_dir=str(cache))

    dm = make(latent_world["vae"])
    assert (dm.channels, dm.resolution, dm.num_classes) == (4, 8, 10)
    assert not list(cache.glob("*"))  # nothing is encoded before the first use
    data = dm.base_dataset()
    z = data.images  # the standardised latents (N, 4, 8, 8)
    assert z.shape == (1797, 4, 8, 8)
    # Independent computation: posterior means of the pixel images, float64 statistics.
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(latent_world["vae"]).eval()
    pixels = dm.images.reference_images(10_000)
    with torch.no_grad():
        raw = torch.cat([vae.encode(x).latent_dist.mean for x in pixels.split(512)]).double()
    flat = raw.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(dm.codec.latent_mean, flat.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dm.codec.latent_std, flat.std(1, unbiased=False), rtol=1e-5, atol=0)
    zm, zs = channel_statistics(z)
    assert zm.abs().max() < 1e-5 and (zs - 0.5).abs().max() < 1e-5  # std σ_d per channel
    torch.testing.assert_close(data.labels, dm.images.base_dataset().labels)
    # FD references are the real pixels, never latents.
    assert dm.reference_images(5).shape == (5, 1, 32, 32)

    cached = list(cache.glob("latents-*.safetensors"))
    assert len(cached) == 1
    again = make(latent_world["vae"])
    again.codec.encode_raw = None  # a cache hit must not encode
    torch.testing.assert_close(again.base_dataset().images, z)
    torch.testing.assert_close(again.codec.latent_std, dm.codec.latent_std)
    other = make(latent_world["vae2"])  # another VAE: another key
    assert other.config_key() != dm.config_key()
    assert vae_fingerprint(latent_world["vae"]) != vae_fingerprint(latent_world["vae2"])


# --- a latent run: checkpoint, sampling decoded, export with the VAE, diffusers load ---------
def test_latent_fit_checkpoint_export_diffusers_load_matches_sampler(latent_world, tmp_path):
    """Two steps of sCD in latent space; the checkpoint carries the latent statistics; the
    rebuilt module samples decoded images; the export holds vae/ and the statistics in
    model_index.json (equal to the checkpoint's, float64 exact); diffusers' own loader runs
    pipeline_scm.py and samples the same images as our sampler to 1e-5 (1 and 2 steps)."""
    from diffusers import DiffusionPipeline

    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.commands import export_checkpoint
    from scm_lightning.restore import rebuild_module

    ckpt_path = fit_two_steps(
        tmp_path / "run",
        latent_world["teacher"],
        "experiment=digits_latent_scd",
        f"data.latent.vae={latent_world['vae']}",
        f"data.latent.cache_dir={tmp_path / 'cache'}",
    )
    ckpt = load_checkpoint(ckpt_path)
    mean = ckpt["state_dict"]["latent_codec.latent_mean"]
    std = ckpt["state_dict"]["latent_codec.latent_std"]
    assert mean.dtype == torch.float64 and mean.shape == (4,) and bool((std > 0).all())

    module, _, _ = rebuild_module(ckpt, with_teacher=False)
    torch.testing.assert_close(module.latent_codec.latent_mean, mean)  # float64 tolerance
    out = export_checkpoint(ckpt_path, tmp_path / "export", ema="online")
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert (out / "vae" / "config.json").is_file()
    stats = index["latent_statistics"]
    assert stats["mean"] == mean.tolist() and stats["std"] == std.tolist()  # exact round trip

    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "SCMPipeline" and pipe.vae is not None
    for nfe in (1, 2):
        ours = module.sample(3, nfe=nfe, generator=torch.Generator().manual_seed(7))
        assert ours.shape == (3, 1, 32, 32)  # decoded images, not 4×8×8 latents
        theirs = pipe(
            batch_size=3,
            num_inference_steps=nfe,
            generator=torch.Generator().manual_seed(7),
            output_type="pt",
        ).images
        torch.testing.assert_close(theirs, (ours / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)
        latents = pipe(
            batch_size=3,
            num_inference_steps=nfe,
            generator=torch.Generator().manual_seed(7),
            output_type="latent",
        ).images
        assert latents.shape == (3, 4, 8, 8)
        torch.testing.assert_close(module.latent_codec.decode(latents), ours, rtol=0, atol=1e-5)

    # `sample` and `evaluate` decode too, from the checkpoint and from the exported folder
    # (the digits classifier takes one channel: latents fed to it would fail).
    import numpy as np

    from scm_lightning.commands import main as command

    sampled, scored = {}, {}
    for tag, source, ema in (("ckpt", ckpt_path, ["ema=online"]), ("folder", out, [])):
        command("sample", [f"ckpt={source}", f"out={tmp_path / tag}", "nfe=2", "num=4", *ema])
        sampled[tag] = np.load(tmp_path / tag / "samples_nfe2_seed0.npz")["samples"]
        assert sampled[tag].shape == (4, 32, 32, 1)
        command(
            "evaluate",
            [
                f"ckpt={source}",
                f"out={tmp_path / tag / 'eval'}",
                "num_samples=8",
                "batch_size=8",
                "nfes=[1]",
                "teacher_nfes=[2]",
                "teacher_grids=[edm]",
                "kid_subsets=1",
                "kid_subset_size=4",
                "pr_k=1",
                *ema,
            ],
        )
        result = json.loads((tmp_path / tag / "eval" / "evaluation.json").read_text())
        scored[tag] = {(r["model"], r["nfe"]): r["fd"] for r in result["results"]}
        assert all(math.isfinite(v) for v in scored[tag].values()), scored
    diff = np.abs(sampled["ckpt"].astype(int) - sampled["folder"].astype(int))
    assert diff.max() <= 1  # the same images up to uint8 rounding
    for key, value in scored["ckpt"].items():
        assert scored["folder"][key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


# --- the bundled latent teacher and its VAE ----------------------------------------------------
def test_bundled_latent_teacher_carries_the_statistics_of_its_data() -> None:
    """The bundled teacher folder (a `pretrain` export) holds the bundled VAE and the
    per-channel statistics of the digits' latents; recomputed here from the data (float64,
    independent of the package's encoder path) they agree, and the teacher takes the
    VAE's latents."""
    from diffusers import AutoencoderKL

    from scm_lightning.assets import asset_path
    from scm_lightning.data.digits import load_digits_tensors

    folder = asset_path("digits_latent_teacher")
    index = json.loads((folder / "model_index.json").read_text())
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = AutoencoderKL.from_pretrained(asset_path("digits_vae")).eval()
    assert unet["in_channels"] == vae.config.latent_channels == 4
    from safetensors.torch import load_file

    weights = "diffusion_pytorch_model.safetensors"
    theirs = load_file(str(folder / "vae" / weights))
    ours = load_file(str(asset_path("digits_vae") / weights))
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():  # the export carries the bundled VAE itself
        torch.testing.assert_close(theirs[key], value)
    images, _ = load_digits_tensors(32, "bilinear")
    with torch.no_grad():
        raw = torch.cat([vae.encode(x).latent_dist.mean for x in images.split(600)]).double()
    flat = raw.transpose(0, 1).reshape(4, -1)
    stats = index["latent_statistics"]
    mean = torch.tensor(stats["mean"], dtype=torch.float64)
    std = torch.tensor(stats["std"], dtype=torch.float64)
    torch.testing.assert_close(mean, flat.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, flat.std(1, unbiased=False), rtol=1e-5, atol=0)
    assert unet["sample_size"] == raw.shape[-1] == 8


# --- end to end from the CLI ------------------------------------------------------------------
@pytest.mark.slow
def test_cli_fit_debug_latent_experiment(tmp_path) -> None:
    """``fit debug=fdr experiment=digits_latent_scd`` with the bundled VAE and latent teacher:
    trains in latent space, writes decoded grids and scores decoded samples with the digits
    classifier (latents fed to it would fail: it takes one channel)."""
    from PIL import Image

    run = tmp_path / "run"
    res = run_cli(
        "fit", "debug=fdr", "experiment=digits_latent_scd", f"run_dir={run}", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    for key in ("fd_teacher_nfe35", "fd_teacher_nfe2", "fd_student_nfe1", "fd_student_nfe2"):
        assert math.isfinite(results[key]), results
    with Image.open(run / "samples" / "samples_final_nfe1.png") as grid:
        # 4 decoded 1×32×32 images, 2 per row, 1 px padding, ×4 (latents: 4 channels, 8 px)
        assert grid.mode == "L" and grid.size == (4 * (2 * 33 + 1), 4 * (2 * 33 + 1))


# --- errors before any work ---------------------------------------------------------------------
def _expect_bad_input(res, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-2000:])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", ["channels_disagree", "missing_vae"])
def test_latent_bad_inputs_stop_before_work(latent_world, tmp_path, case) -> None:
    """Through the CLI: exit 2, one line naming the key and both sides, nothing written."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    args = [
        "fit",
        "experiment=digits_latent_scd",
        f"teacher.path={latent_world['teacher']}",
        f"data.latent.vae={latent_world['vae']}",
        f"data.latent.cache_dir={cache}",
        f"run_dir={run}",
    ]
    if case == "channels_disagree":  # 2 latent channels, a 4-channel teacher
        args.append(f"data.latent.vae={latent_world['vae2']}")
        needles = ["teacher and data disagree", "4 input channels", "data.latent.vae="]
    else:
        args.append(f"data.latent.vae={tmp_path / 'nowhere'}")
        needles = ["data.latent.vae=", "does not exist", "AutoencoderKL"]
    res = run_cli(*args, cwd=tmp_path)
    _expect_bad_input(res, *needles)
    assert not run.exists() and not cache.exists()  # nothing written


def test_latent_vae_that_does_not_fit_the_images_is_refused(latent_world, tmp_path) -> None:
    """A 32×32 VAE on 16×16 images: ConfigError (exit 2 in the CLI, as above) before any
    encoding, caching or run folder."""
    from scm_lightning.config import ConfigError, compose_config
    from scm_lightning.training import run

    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    cfg = compose_config(
        "fit",
        [
            "experiment=digits_latent_scd",
            f"teacher.path={latent_world['teacher']}",
            f"data.latent.vae={latent_world['vae']}",
            f"data.latent.cache_dir={cache}",
            "data.resolution=16",
            f"run_dir={run_dir}",
        ],
    )
    with pytest.raises(ConfigError) as err:
        run(cfg)
    message = str(err.value)
    assert "\n" not in message
    for needle in ("data.latent.vae=", "1×32×32", "1×16×16"):
        assert needle in message, message
    assert not run_dir.exists() and not cache.exists()
