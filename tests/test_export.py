"""diffusers export: adapter description round trips, SCMPipeline vs the reference sampler,
checkpoint -> folder -> images identical to `sample`, and the pretrain teacher folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import SCMScheduler, UNet2DModel

from scm_lightning import sampling
from scm_lightning.nets.trigflow_unet import TrigFlowUNet
from scm_lightning.pipeline import load_pipeline, pipeline_from_adapter, save_pipeline
from scm_lightning.pipeline_scm import SCMPipeline
from scm_lightning.teachers.description import adapter_description, build_adapter
from scm_lightning.teachers.edm import EDMAdapter
from scm_lightning.teachers.guidance import attach_guidance_embedding
from scm_lightning.teachers.schedule import FlowSchedule, ScheduleAdapter, TabulatedSchedule
from scm_lightning.teachers.trigflow import TrigFlowNative

SD = 0.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions on a shared 2-core machine: one thread is ~50x faster than two
    oversubscribed ones. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- a tiny real run, built once per session (also used by test_commands.py) ------------------
def tiny_run(base: Path) -> dict[str, Path]:
    """`pretrain` 2 steps (exporting the teacher folder), then `fit` 2 steps from it."""
    paths = {
        "teacher": base / "teacher",
        "pretrain_ckpt": base / "pre" / "checkpoints" / "last.ckpt",
        "fit_ckpt": base / "fit" / "checkpoints" / "last.ckpt",
        "fit_dir": base / "fit",
    }
    if paths["fit_ckpt"].is_file():
        return paths
    from scm_lightning.config import compose_config
    from scm_lightning.training import run

    common = [
        "++trainer.max_steps=2",
        "++data.batch_size=8",
        "++eval.num_samples=16",
        "++eval.batch_size=16",
        "++eval.teacher_nfes=[3]",
        "++eval.student_nfes=[1]",
        "++callbacks.checkpoint.every_n_train_steps=2",
        "++trainer.val_check_interval=2",
        "++trainer.limit_val_batches=1",
        "++trainer.enable_progress_bar=false",
        "callbacks.samples=null",
        "callbacks.progress=null",
    ]
    fid = [  # FID at every step, so the run has a history to plot
        "++callbacks.fid.num_samples=16",
        "++callbacks.fid.every_n_steps=1",
        "++callbacks.fid.nfes=[1]",
        "++callbacks.fid.num_ref_samples=64",
        f"++callbacks.fid.ref_cache_dir={base / 'cache'}",
    ]
    saved = os.environ.get("SCM_RUN_DIR")
    try:
        run(
            compose_config(
                "pretrain",
                [
                    f"run_dir={base / 'pre'}",
                    f"export_dir={paths['teacher']}",
                    "++net.block_channels=[8,16]",
                    "++net.attention_head_dim=8",
                    "callbacks.fid=null",
                    *common,
                ],
            )
        )
        run(
            compose_config(
                "fit",
                [f"run_dir={base / 'fit'}", f"teacher.path={paths['teacher']}", *common, *fid],
            )
        )
    finally:  # compose_config exports the run dir for DDP children; don't leak it
        if saved is None:
            os.environ.pop("SCM_RUN_DIR", None)
        else:
            os.environ["SCM_RUN_DIR"] = saved
    return paths


@pytest.fixture(scope="module")
def run_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_run(tmp_path_factory.getbasetemp() / "scm_tiny_run")


# --- adapters and the pipeline on tiny random nets ----------------------------------------
def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised output layers would make F ≡ 0
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def _trigflow_unet(**kw) -> TrigFlowUNet:
    return _randomise(TrigFlowUNet(block_channels=(8, 16), attention_head_dim=8, **kw))


def _unet2d() -> UNet2DModel:
    return _randomise(
        UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
    )


def _adapters() -> dict[str, TrigFlowNative | EDMAdapter | ScheduleAdapter]:
    edm = EDMAdapter(_unet2d(), SD, "v_prediction")
    attach_guidance_embedding(edm, num_channels=16)
    _randomise(edm.guidance_embedding, seed=1)
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    return {
        "trigflow": TrigFlowNative(_trigflow_unet(num_classes=3, guidance_embedding=True), SD),
        "edm+guidance_embedding": edm,
        "vp": ScheduleAdapter(
            _unet2d(),
            SD,
            TabulatedSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0)),
            "epsilon",
        ),
        "flow": ScheduleAdapter(_unet2d(), SD, FlowSchedule(1000), "flow", data_scale=2.0),
    }


@pytest.mark.parametrize("name", list(_adapters()))
def test_adapter_description_round_trip(name: str, tmp_path: Path) -> None:
    """describe -> JSON/safetensors -> build gives the same F on fresh inputs, also after a
    full save_pretrained / from_pretrained of the pipeline."""
    adapter = _adapters()[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8, 1.2, 1.5])
    kw: dict = {}
    if adapter.num_classes:
        kw["class_labels"] = torch.tensor([0, 1, 2, 3])
    if adapter.accepts_guidance:
        kw["guidance"] = torch.tensor([1.0, 1.5, 2.0, 3.0])
    ref = adapter(x, t, **kw)
    desc = json.loads(json.dumps(adapter_description(adapter)))  # must survive JSON
    rebuilt = build_adapter(adapter.net, desc)
    if adapter.guidance_embedding is not None:  # learned weights travel with the state dict
        rebuilt.guidance_embedding.load_state_dict(adapter.guidance_embedding.state_dict())
    torch.testing.assert_close(rebuilt(x, t, **kw), ref, rtol=1e-6, atol=1e-6)

    save_pipeline(pipeline_from_adapter(adapter, image_shape=[1, 8, 8]), tmp_path)
    pipe = load_pipeline(tmp_path)
    assert pipe.adapter_config["kind"] == desc["kind"]
    got = pipe.model_F(x, t, kw.get("class_labels"), kw.get("guidance"))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    if name.startswith("edm"):  # the guidance embedding really matters (not zero)
        no_s = pipe.model_F(x, t, guidance=torch.ones(4))
        assert (no_s - ref).abs().max() > 1e-3


@pytest.mark.parametrize("nfe", [1, 2, 3])
def test_pipeline_matches_consistency_sampler(nfe: int) -> None:
    """Same seed -> same images as sampling.consistency_sample (prior drawn first, one z per
    re-noise), with labels and a guidance scale; explicit times for nfe = 3."""
    adapter = TrigFlowNative(_trigflow_unet(num_classes=3, guidance_embedding=True), SD)
    pipe = pipeline_from_adapter(adapter)
    times = sampling.consistency_times(nfe, sigma_data=SD, t_mid=1.0)
    labels = torch.tensor([2, 0, 1, 1, 3])
    s = torch.full((5,), 1.7)
    g = torch.Generator().manual_seed(7)
    ref = sampling.consistency_sample(
        adapter, SD * torch.randn(5, 1, 8, 8, generator=g), times, SD, labels, s, generator=g
    )
    kwargs = {"timesteps": [*times, 0.0]} if nfe == 3 else {"intermediate_timesteps": 1.0}
    out = pipe(
        5,
        nfe,
        generator=torch.Generator().manual_seed(7),
        guidance_scale=1.7,
        class_labels=labels,
        output_type="latent",
        **kwargs,
    ).images
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (out - ref).abs().max() < 1e-6 < ref.abs().max()
    if nfe > 1:
        return
    np_img = pipe(2, nfe, output_type="np", class_labels=0, **kwargs).images
    assert np_img.shape == (2, 8, 8, 1) and 0 <= np_img.min() <= np_img.max() <= 1
    pil = pipe(2, nfe, output_type="pil", class_labels=0, **kwargs).images
    assert len(pil) == 2 and pil[0].size == (8, 8)


def test_pipeline_rejects_bad_input() -> None:
    pipe = pipeline_from_adapter(TrigFlowNative(_trigflow_unet(), SD))
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        pipe(1, 0, output_type="latent")
    with pytest.raises(ValueError, match="no guidance input"):
        pipe(1, 1, guidance_scale=2.0, output_type="latent")
    with pytest.raises(ValueError, match="unconditional"):
        pipe(1, 1, class_labels=[1], output_type="latent")
    with pytest.raises(ValueError, match="strictly decreasing"):
        pipe(1, 2, timesteps=[1.0, 1.2, 0.0], output_type="latent")
    with pytest.raises(ValueError, match="output_type"):
        pipe(1, 1, output_type="jpeg")
    with pytest.raises(ValueError, match="sigma_data"):
        SCMPipeline(
            pipe.unet,
            SCMScheduler(sigma_data=1.0),
            adapter={**pipe.adapter_config, "sigma_data": 0.5},
        )


# --- checkpoints -> folders ------------------------------------------------------------------
def test_export_round_trip_matches_sample(run_paths: dict[str, Path], tmp_path: Path) -> None:
    """`export` -> SCMPipeline.from_pretrained gives the same images as the checkpoint's EMA
    student sampled as `sample` does (same seed, NFE 1 and 2), and the folder holds the EMA
    weights, not the online ones."""
    from scm_lightning import commands
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_swapped, resolve_profile
    from scm_lightning.restore import rebuild_module

    out = tmp_path / "export"
    assert commands.main("export", [f"ckpt={run_paths['fit_ckpt']}", f"out={out}"]) == 0
    desc = json.loads((out / "model_index.json").read_text())["adapter"]
    assert desc["kind"] == "trigflow" and desc["model"] == "consistency"
    assert desc["ema_profile"] == "power_0.05" and desc["global_step"] == 2
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "SCMScheduler" and sched["prediction_type"] == "trigflow"
    assert sched["sigma_data"] == SD and sched["intermediate_timesteps"] == desc["t_mid"]
    assert sched["max_timesteps"] == desc["t_max"]
    pipe = load_pipeline(out)

    ckpt = load_checkpoint(run_paths["fit_ckpt"])
    module, _, _ = rebuild_module(ckpt)
    online = {k: v.clone() for k, v in module.student.net.net.state_dict().items()}
    ema = ckpt["callbacks"][next(k for k in ckpt["callbacks"] if k.startswith("EMA"))]
    ema_net = {
        k.removeprefix("net.net."): v
        for k, v in ema["ema"]["power_0.05"].items()
        if k.startswith("net.net.")
    }
    exported = pipe.unet.state_dict()
    assert all(torch.equal(exported[k], ema_net[k]) for k in exported)
    assert any(not torch.equal(exported[k], online[k]) for k in exported)

    profile = resolve_profile(ckpt, None)
    for nfe in (1, 2):
        with ema_swapped(module, ckpt, profile):
            ref = module.sample(6, nfe=nfe, generator=torch.Generator().manual_seed(0))
        got = pipe(6, nfe, generator=torch.Generator().manual_seed(0), output_type="latent").images
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # the swap is undone
    assert all(torch.equal(v, online[k]) for k, v in module.student.net.net.state_dict().items())


def test_pretrain_export_is_a_loadable_teacher(run_paths: dict[str, Path]) -> None:
    """The folder written after `pretrain` loads with load_teacher and is the EMA network."""
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_swapped
    from scm_lightning.restore import rebuild_module
    from scm_lightning.teachers.loading import load_teacher

    teacher = load_teacher(run_paths["teacher"])
    assert isinstance(teacher, TrigFlowNative) and teacher.sigma_data == SD
    desc = json.loads((run_paths["teacher"] / "model_index.json").read_text())["adapter"]
    assert desc["model"] == "diffusion" and desc["task"] == "pretrain"
    ckpt = load_checkpoint(run_paths["pretrain_ckpt"])
    module, _, _ = rebuild_module(ckpt)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.9, 1.4])
    with ema_swapped(module, ckpt, desc["ema_profile"]):
        torch.testing.assert_close(teacher(x, t), module.student(x, t), rtol=1e-5, atol=1e-6)


def test_load_prepared_teacher_refuses_a_plain_pretrain_checkpoint(
    run_paths: dict[str, Path],
) -> None:
    """restore.load_prepared_teacher rebuilds the run and wants a prepare_from student."""
    from scm_lightning.restore import load_prepared_teacher

    with pytest.raises(ValueError, match="not a teacher-preparation checkpoint"):
        load_prepared_teacher(str(run_paths["pretrain_ckpt"]))
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
        load_prepared_teacher(str(Path(__file__)))


def test_export_trained_network_swaps_back(run_paths: dict[str, Path], tmp_path: Path) -> None:
    """export_trained_network exports the EMA profile and restores the online weights."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from scm_lightning.callbacks.ema import EMA
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_state, export_trained_network
    from scm_lightning.restore import rebuild_module

    ckpt = load_checkpoint(run_paths["pretrain_ckpt"])
    module, _, _ = rebuild_module(ckpt)
    ema = EMA(profiles={"power_0.05": {"kind": "power", "std": 0.05}})
    ema.load_state_dict(ema_state(ckpt))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = SimpleNamespace(callbacks=[ema], global_step=2)
    out = export_trained_network(trainer, module, tmp_path / "teacher")
    after = module.student.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    averaged = ema_state(ckpt)["ema"]["power_0.05"]
    assert all(torch.equal(weights[k], averaged["net." + k]) for k in weights)
    with pytest.raises(ValueError, match="not empty"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("keep me")
        export_trained_network(trainer, module, tmp_path / "other")
