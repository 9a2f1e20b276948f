"""Exports load with diffusers' own loader, in a process that never imports scm_lightning.

* ``pipeline_scm.py`` (the self-contained file copied into every export) gives the same F as
  the in-project adapters for every kind, and the same default times as ``sampling``.
* For students of a TrigFlow, an EDM and a VP teacher: ``fit`` 2 steps, ``export``, then a
  fresh subprocess that blocks ``import scm_lightning`` loads the folder with
  ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` and samples; its images
  match what ``sample`` computes from the checkpoint (1e-5), and the scheduler config alone
  reproduces the run's times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler

from scm_lightning import pipeline_scm, sampling
from scm_lightning.pipeline import load_pipeline, pipeline_from_adapter, save_pipeline
from scm_lightning.teachers.denoiser import DenoiserAdapter
from test_export import _adapters, _unet2d

SD = 0.5

# Heads every fresh-process script: scm_lightning cannot even be imported there.
NO_PROJECT = r"""
import importlib.abc, sys

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "scm_lightning" or name.startswith("scm_lightning."):
            raise ImportError("scm_lightning must not be needed to load an export")
        return None

sys.meta_path.insert(0, NoProject())
"""
# Then diffusers' own loader on the export at argv[1]; argv[2] is the folder for the results.
LOAD_PIPELINE = r"""
import torch
from diffusers import DiffusionPipeline

folder, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, low_cpu_mem_usage=False)
"""
LOAD_SCRIPT = (
    LOAD_PIPELINE
    + r"""
import json
import numpy as np
from diffusers import SCMScheduler

for nfe in (1, 2):
    gen = torch.Generator().manual_seed(0)
    images = pipe(6, nfe, generator=gen, output_type="latent").images
    np.save(f"{out}/nfe{nfe}.npy", images.numpy())
scheduler = SCMScheduler.from_pretrained(folder, subfolder="scheduler")
scheduler.set_timesteps(
    2,
    max_timesteps=scheduler.config.max_timesteps,
    intermediate_timesteps=scheduler.config.intermediate_timesteps,
)
assert "scm_lightning" not in sys.modules
info = {"pipeline": type(pipe).__name__, "times": scheduler.timesteps.tolist()}
json.dump(info, open(f"{out}/info.json", "w"))
"""
)


def fresh_process_env(tmp: Path) -> dict[str, str]:
    """The venv's interpreter without our source on PYTHONPATH, offline, its own module cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_MODULES_CACHE=str(tmp / "hf_modules"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return env


def run_without_project(body: str, *args: str | Path, cwd: Path) -> None:
    """Run ``NO_PROJECT + body`` as ``cwd/fresh.py`` with the venv's interpreter, isolated
    (``-I``), offline; it must exit 0."""
    script = cwd / "fresh.py"
    script.write_text(NO_PROJECT + body)
    res = subprocess.run(
        [sys.executable, "-I", str(script), *map(str, args)],
        env=fresh_process_env(cwd),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]


def load_in_fresh_process(folder: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_without_project(LOAD_SCRIPT, folder, out, cwd=out)
    return json.loads((out / "info.json").read_text())


# --- pipeline_scm.py against the in-project adapters ---------------------------------------
def _all_adapters() -> dict:
    adapters = _adapters()
    adapters["denoiser"] = DenoiserAdapter(_unet2d(), SD, sigma_min=0.01, sigma_max=50.0)
    return adapters


@pytest.mark.parametrize("name", list(_all_adapters()))
def test_standalone_F_equals_the_adapters(name: str, tmp_path: Path) -> None:
    """pipeline_scm.trigflow_F (+ its guidance embedding) = the project's adapter, also after
    save_pipeline / load_pipeline, on times over the whole range including the ends."""
    adapter = _all_adapters()[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0.0, 1e-4, 0.3, 0.8, 1.3, torch.pi / 2])
    labels = torch.tensor([0, 1, 2, 3, 0, 1]) if adapter.num_classes else None
    s = torch.tensor([1.0, 1.5, 2.0, 3.0, 1.2, 1.0]) if adapter.accepts_guidance else None
    with torch.no_grad():
        ref = adapter(x, t, labels, s)
        pipe = pipeline_from_adapter(adapter, image_shape=[1, 8, 8])
        torch.testing.assert_close(pipe.model_F(x, t, labels, s), ref, rtol=0, atol=1e-6)
        save_pipeline(pipe, tmp_path)
        loaded = load_pipeline(tmp_path)
        torch.testing.assert_close(loaded.model_F(x, t, labels, s), ref, rtol=0, atol=1e-6)
    assert torch.isfinite(ref).all()
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_scm", "SCMPipeline"]
    assert index["adapter"]["kind"] == name.split("+")[0]
    assert (tmp_path / "pipeline_scm.py").read_text() == Path(pipeline_scm.__file__).read_text()
    assert not (tmp_path / "adapter.json").exists()


def test_description_and_standalone_file_agree_on_the_format() -> None:
    from scm_lightning.teachers import description

    assert description.ADAPTER_FORMAT == pipeline_scm.ADAPTER_FORMAT
    assert set(description.CONDITIONING) == set(pipeline_scm.ADAPTER_KINDS)


@pytest.mark.parametrize("nfe", [1, 2, 3, 5])
def test_standalone_times_equal_sampling(nfe: int) -> None:
    for t_mid in (1.1, 0.7):
        ref = sampling.consistency_times(nfe, t_max=1.5, t_mid=t_mid, sigma_data=SD)
        got = pipeline_scm.consistency_times(nfe, 1.5, t_mid, SD)
        assert got == pytest.approx(ref, rel=0, abs=1e-15)


def test_missing_or_unknown_adapter_fails_loudly() -> None:
    pipe = pipeline_from_adapter(_adapters()["vp"], image_shape=[1, 8, 8])
    for bad in (None, {**pipe.adapter_config, "kind": "karras"}, {"kind": "edm"}):
        with pytest.raises(ValueError, match="adapter"):
            pipeline_scm.SCMPipeline(pipe.unet, pipe.scheduler, adapter=bad)
    with pytest.raises(ValueError, match="newer"):
        pipeline_scm.SCMPipeline(
            pipe.unet, pipe.scheduler, adapter={**pipe.adapter_config, "format": 99}
        )


# --- fit -> export -> diffusers in a fresh process -------------------------------------------
def _write_schedule_teacher(path: Path, scheduler) -> Path:
    net = _unet2d()  # random weights, so the teacher's F is not zero
    net.save_pretrained(path / "unet")
    scheduler.save_config(path / "scheduler")
    return path


def _teacher_folders(base: Path) -> dict[str, Path]:
    from conftest import write_tiny_teacher

    return {
        "trigflow": write_tiny_teacher(base / "trigflow"),
        "edm": _write_schedule_teacher(base / "edm", EDMEulerScheduler(sigma_data=SD)),
        "vp": _write_schedule_teacher(base / "vp", DDPMScheduler(num_train_timesteps=100)),
    }


def _fit(teacher: Path, run_dir: Path) -> Path:
    from conftest import fit_two_steps

    return fit_two_steps(run_dir, teacher, "loss.t_mid=1.0")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["trigflow", "edm", "vp"])
def test_diffusers_loads_the_export_in_a_fresh_process(kind: str, tmp_path: Path) -> None:
    from scm_lightning import commands
    from scm_lightning.checkpointing import load_checkpoint
    from scm_lightning.export import ema_swapped, resolve_profile
    from scm_lightning.images import to_uint8
    from scm_lightning.restore import rebuild_module

    torch.set_num_threads(1)
    teacher = _teacher_folders(tmp_path / "teachers")[kind]
    ckpt_path = _fit(teacher, tmp_path / "run")
    folder = tmp_path / "export"
    assert commands.main("export", [f"ckpt={ckpt_path}", f"out={folder}"]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["adapter"]["kind"] == kind and index["adapter"]["t_mid"] == 1.0
    info = load_in_fresh_process(folder, tmp_path / "fresh")
    assert info["pipeline"] == "SCMPipeline"

    ckpt = load_checkpoint(ckpt_path)
    module, _, _ = rebuild_module(ckpt)
    times = sampling.consistency_times(2, t_mid=1.0, sigma_data=SD)
    assert info["times"] == pytest.approx([*times, 0.0], abs=1e-6)
    with ema_swapped(module, ckpt, resolve_profile(ckpt, None)):
        for nfe in (1, 2):
            ref = module.sample(6, nfe=nfe, generator=torch.Generator().manual_seed(0))
            got = torch.from_numpy(np.load(tmp_path / "fresh" / f"nfe{nfe}.npy"))
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
            assert ref.abs().max() > 1e-2  # not trivially zero
    # and the `sample` command's own output, through the CLI entry point
    out = tmp_path / "sampled"
    assert commands.main("sample", [f"ckpt={ckpt_path}", f"out={out}", "nfe=2", "num=6"]) == 0
    cli_u8 = np.load(out / "samples_nfe2_seed0.npz")["samples"].astype(int)
    fresh_u8 = to_uint8(torch.from_numpy(np.load(tmp_path / "fresh" / "nfe2.npy"))).astype(int)
    assert np.abs(cli_u8 - fresh_u8).max() <= 1


def readme_block(section: str, lang: str = "python") -> str:
    """The first ```lang block under the README's ``## section`` heading."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_diffusers_snippet_runs_without_the_project(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The README's "Load an export with diffusers" snippet, verbatim, in a fresh process that
    cannot import scm_lightning, next to a folder written by `export`."""
    from scm_lightning import commands
    from test_export import tiny_run

    paths = tiny_run(tmp_path_factory.getbasetemp() / "scm_tiny_run")  # shared with test_commands
    assert (
        commands.main("export", [f"ckpt={paths['fit_ckpt']}", f"out={tmp_path / 'exported'}"]) == 0
    )
    snippet = readme_block("Load an export with diffusers")
    run_without_project(
        snippet + "\nassert len(images) == 4 and images[0].size == (8, 8)\n"
        "assert 'scm_lightning' not in sys.modules\n",
        cwd=tmp_path,
    )


SAMPLE_SCRIPT = r"""
import numpy as np
import torch
from diffusers import DiffusionPipeline

for folder in sys.argv[1:]:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    kwargs = {"guidance_scale": 1.7} if pipe.accepts_guidance else {}
    gen = torch.Generator().manual_seed(5)
    images = pipe(3, 2, generator=gen, output_type="latent", **kwargs).images
    np.save(f"{folder}.npy", images.numpy())
assert "scm_lightning" not in sys.modules
"""


@pytest.mark.slow
def test_every_adapter_kind_samples_alike_in_a_fresh_process(tmp_path: Path) -> None:
    """Guidance input (native and embedding component), class labels, flow and denoiser
    adapters: diffusers' loader in a process without scm_lightning gives the in-project
    pipeline's images."""
    adapters = _all_adapters()
    refs = {}
    for name, adapter in adapters.items():
        folder = tmp_path / name.replace("+", "_")
        pipe = pipeline_from_adapter(adapter, image_shape=[1, 8, 8], t_mid=1.0)
        save_pipeline(pipe, folder)
        kwargs = {"guidance_scale": 1.7} if pipe.accepts_guidance else {}
        gen = torch.Generator().manual_seed(5)
        refs[folder] = pipe(3, 2, generator=gen, output_type="latent", **kwargs).images
    run_without_project(SAMPLE_SCRIPT, *refs, cwd=tmp_path)
    for folder, ref in refs.items():
        got = torch.from_numpy(np.load(f"{folder}.npy"))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=str(folder))
