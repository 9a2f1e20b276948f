"""Exported diffusers folders: written from a TrigFlow adapter, read back without remote code.

The pipeline class itself lives in :mod:`scm_lightning.pipeline_scm`, a self-contained file
(torch, numpy, diffusers only) that :func:`save_pipeline` copies into the folder, so diffusers'
own loader (``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``) samples it
correctly in a process without scm_lightning. Inside the project, :func:`load_pipeline` reads
the same folder with the package's classes (no code is executed from the folder).
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from diffusers import SCMScheduler
from torch import nn

from scm_lightning import pipeline_scm
from scm_lightning.pipeline_scm import SCMGuidanceEmbedding, SCMPipeline
from scm_lightning.teachers.base import NetAdapter
from scm_lightning.teachers.description import adapter_description, build_adapter

PIPELINE_FILE = "pipeline_scm.py"  # diffusers custom pipeline: model_index "_class_name"[0]
LEGACY_ADAPTER_JSON = "adapter.json"  # format 1 folders (adapter beside, not in, the config)
LEGACY_ADAPTER_TENSORS = "adapter.safetensors"


TEXT_COMPONENTS = ("text_encoder", "tokenizer")


def load_text_components(folder: str | Path | None) -> dict[str, Any]:
    """``{"text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer}`` from a teacher folder
    that holds ``text_encoder/`` and ``tokenizer/`` (needs ``transformers``: the ``text``
    extra); ``{}`` when it holds neither."""
    if folder is None:
        return {}
    folder = Path(folder)
    present = [name for name in TEXT_COMPONENTS if (folder / name).is_dir()]
    if not present:
        return {}
    if len(present) != len(TEXT_COMPONENTS):
        raise ValueError(
            f"{folder} holds {present[0]}/ without its partner; need both of {TEXT_COMPONENTS}"
        )
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise ImportError(
            f"{folder} holds a text encoder: install transformers (pip install "
            "'scm-lightning[text]') to export it"
        ) from err
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
    return {
        "text_encoder": encoder.eval().requires_grad_(False),
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
    }


def pipeline_from_adapter(
    adapter: NetAdapter,
    text_components: dict[str, Any] | None = None,
    vae: nn.Module | None = None,
    latent_statistics: dict[str, Any] | None = None,
    **extra: Any,
) -> SCMPipeline:
    """An :class:`SCMPipeline` around ``adapter.net`` (shared, not copied); ``text_components``
    (:func:`load_text_components`) give a text-conditioned one its prompt encoder; a latent
    model's ``vae`` and ``latent_statistics`` (``{"mean": [μ_c], "std": [s_c]}``) join it.

    ``extra`` (model type, image shape, ``t_max``, ``t_mid``, EMA profile, step, ...) joins the
    adapter description; ``t_max``/``t_mid`` also become the scheduler's ``max_timesteps`` /
    ``intermediate_timesteps`` so that ``SCMScheduler.from_pretrained`` alone gives our times.
    """
    desc = {**extra, **adapter_description(adapter)}
    scheduler = SCMScheduler(prediction_type="trigflow", sigma_data=desc["sigma_data"])
    times = {"max_timesteps": extra.get("t_max"), "intermediate_timesteps": extra.get("t_mid")}
    scheduler.register_to_config(**{k: float(v) for k, v in times.items() if v is not None})
    emb = None
    if adapter.guidance_embedding is not None:
        own = adapter.guidance_embedding
        spec = desc["guidance_embedding"]
        emb = SCMGuidanceEmbedding(spec["embed_dim"], spec["num_channels"], spec["input_scale"])
        emb.linear.load_state_dict(own.linear.state_dict())
        emb.linear.to(own.linear.weight.device, own.linear.weight.dtype)
    return SCMPipeline(
        unet=adapter.net,
        scheduler=scheduler,
        guidance_embedding=emb,
        adapter=desc,
        vae=vae,
        latent_statistics=latent_statistics,
        **(text_components or {}),
    )


def standalone_source(module: Any) -> str:
    """Source of ``module`` with its ``from scm_lightning... import name`` lines replaced by
    the named functions' own source, so that it runs without scm_lightning installed."""
    lines = []
    for line in inspect.getsource(module).splitlines(keepends=True):
        if line.startswith("from scm_lightning."):
            source_module, names = line[5:].split(" import ")
            owner = importlib.import_module(source_module.strip())
            for name in names.split(","):
                lines.append("\n\n" + inspect.getsource(getattr(owner, name.strip())) + "\n")
        else:
            lines.append(line)
    text = "".join(lines)
    if "scm_lightning" in "".join(ln for ln in text.splitlines() if "import" in ln):
        raise ValueError(f"{module.__name__} still imports scm_lightning after inlining")
    return text


def _standalone_component(net: nn.Module) -> tuple[str, str] | None:
    """``(file stem, source)`` for a network class of ours that diffusers cannot import."""
    from scm_lightning.nets import trigflow_unet

    if isinstance(net, trigflow_unet.TrigFlowUNet):
        return "trigflow_unet", standalone_source(trigflow_unet)
    return None


def save_pipeline(pipe: SCMPipeline, out: str | Path) -> Path:
    """``pipe.save_pretrained(out)`` plus what diffusers needs to load it without scm_lightning:
    ``pipeline_scm.py`` named in ``model_index.json`` and the source of a TrigFlowUNet."""
    out = Path(out)
    _plain_config(pipe.unet)
    pipe.save_pretrained(out)
    for stale in (LEGACY_ADAPTER_JSON, LEGACY_ADAPTER_TENSORS):  # an older export there
        (out / stale).unlink(missing_ok=True)
    pipeline_source = Path(pipeline_scm.__file__).read_text()
    (out / PIPELINE_FILE).write_text(pipeline_source)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [PIPELINE_FILE.removesuffix(".py"), "SCMPipeline"]
    component = _standalone_component(pipe.unet)
    if component is not None:
        stem, source = component
        (out / "unet" / f"{stem}.py").write_text(source)
        index["unet"] = [stem, type(pipe.unet).__name__]
    if pipe.guidance_embedding is not None:
        (out / "guidance_embedding" / PIPELINE_FILE).write_text(pipeline_source)
        index["guidance_embedding"] = [PIPELINE_FILE.removesuffix(".py"), "SCMGuidanceEmbedding"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def _plain_config(net: nn.Module) -> None:
    """Replace OmegaConf containers in a diffusers config (a net built by Hydra's
    ``instantiate`` without ``_convert_``) by plain lists/dicts, so it serialises to JSON."""
    from omegaconf import OmegaConf

    bad = {k: OmegaConf.to_container(v) for k, v in net.config.items() if OmegaConf.is_config(v)}
    if bad:
        net.register_to_config(**bad)


def read_description(folder: str | Path) -> dict[str, Any] | None:
    """The adapter description of an exported folder: ``model_index.json``'s ``adapter``, or a
    format-1 ``adapter.json`` beside it (trigflow/edm only; others need a re-export); None when
    the folder has neither."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if index_path.is_file():
        adapter = json.loads(index_path.read_text()).get("adapter")
        if isinstance(adapter, dict):
            return adapter
    legacy = folder / LEGACY_ADAPTER_JSON
    if not legacy.is_file():
        return None
    try:
        desc = json.loads(legacy.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{legacy} is not valid JSON: {err}") from None
    if desc.get("kind") not in ("trigflow", "edm") or desc.get("guidance") == "embedding":
        raise ValueError(
            f"{legacy} (format 1) with kind={desc.get('kind')!r}, guidance="
            f"{desc.get('guidance')!r} keeps tensors beside it: export the checkpoint again"
        )
    return desc


def load_pipeline(folder: str | Path) -> SCMPipeline:
    """An exported folder as an :class:`SCMPipeline` built from the package's own classes
    (nothing from the folder is executed); raises when the folder holds no export."""
    from scm_lightning.teachers.loading import model_class

    folder = Path(folder)
    index_path = folder / "model_index.json"
    desc = read_description(folder) if index_path.is_file() else None
    if desc is None:
        raise FileNotFoundError(
            f"{str(folder)!r} is not an exported scm_lightning folder (model_index.json with an "
            "adapter description)"
        )
    index = json.loads(index_path.read_text())
    unet_dir = folder / "unet"
    cls = model_class(index["unet"][1], unet_dir)
    kwargs = {"low_cpu_mem_usage": False, "use_safetensors": True}
    unet = cls.from_pretrained(unet_dir, **kwargs).eval()
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # max_timesteps/intermediate_timesteps: ours, kept
    try:
        scheduler = SCMScheduler.from_pretrained(folder / "scheduler")
    finally:
        diffusers_logging.set_verbosity(verbosity)
    emb = None
    if desc.get("guidance") == "embedding":
        emb = SCMGuidanceEmbedding.from_pretrained(folder / "guidance_embedding", **kwargs)
    has_text = all((index.get(n) or [None])[0] for n in TEXT_COMPONENTS)  # [null, null]: none
    text = load_text_components(folder) if has_text else {}
    vae, latent_statistics = None, index.get("latent_statistics")
    if (index.get("vae") or [None])[0] is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder / "vae", **kwargs).eval()
    return SCMPipeline(
        unet=unet,
        scheduler=scheduler,
        guidance_embedding=emb,
        adapter=desc,
        vae=vae,
        latent_statistics=latent_statistics,
        **text,
    )


def pipeline_adapter(pipe: SCMPipeline) -> NetAdapter:
    """The in-project TrigFlow adapter around ``pipe.unet`` (shared), guidance weights loaded."""
    adapter = build_adapter(pipe.unet, pipe.adapter_config)
    if pipe.guidance_embedding is not None:
        adapter.guidance_embedding.linear.load_state_dict(
            pipe.guidance_embedding.linear.state_dict()
        )
    return adapter.eval().requires_grad_(False)


__all__ = [
    "SCMGuidanceEmbedding",
    "SCMPipeline",
    "adapter_description",
    "build_adapter",
    "load_pipeline",
    "load_text_components",
    "pipeline_adapter",
    "pipeline_from_adapter",
    "read_description",
    "save_pipeline",
]
