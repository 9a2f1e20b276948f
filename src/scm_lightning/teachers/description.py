"""A TrigFlow adapter as plain JSON data, and back (spec §2).

:func:`adapter_description` turns a single-network adapter (:class:`TrigFlowNative`,
:class:`EDMAdapter`, :class:`ScheduleAdapter`, :class:`DenoiserAdapter`) into a JSON-able dict;
:func:`build_adapter` wraps a raw network as the dict says (its inverse). The dict is the
``adapter`` entry of an exported pipeline's ``model_index.json`` (read there by the
self-contained ``pipeline_scm.py``) and of a checkpoint's ``scm_student`` record (so a student
is rebuilt without its teacher). A tabulated VP schedule travels as float64 lists (exact in
JSON); learned tensors (a guidance embedding) stay in the weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from scm_lightning.teachers.base import NetAdapter
from scm_lightning.teachers.denoiser import DenoiserAdapter
from scm_lightning.teachers.edm import EDMAdapter
from scm_lightning.teachers.guidance import attach_guidance_embedding
from scm_lightning.teachers.schedule import FlowSchedule, ScheduleAdapter, TabulatedSchedule
from scm_lightning.teachers.trigflow import TrigFlowNative

ADAPTER_FORMAT = 2  # = pipeline_scm.ADAPTER_FORMAT (kinds below, schedule knots as lists)
CONDITIONING = {
    "trigflow": "c_noise = t (TrigFlow time in radians)",
    "edm": "c_noise = ln(sigma_data * tan t) / 4 (EDM), input x_t / sigma_data",
    "vp": "teacher timestep from log-SNR matching on a tabulated alpha/sigma schedule",
    "flow": "teacher timestep s * num_train_timesteps, s = sigmoid(log-SNR), rectified flow",
    "denoiser": "D(x_t / cos t; sigma = sigma_data * tan t), x0-prediction",
}


def adapter_description(adapter: nn.Module) -> dict[str, Any]:
    """JSON-able description of ``adapter`` (a :class:`NetAdapter`; module doc)."""
    if not isinstance(adapter, NetAdapter):
        raise TypeError(
            f"only single-network adapters (NetAdapter) export, got {type(adapter).__name__}"
        )
    desc: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "sigma_data": float(adapter.sigma_data),
        "num_classes": adapter.num_classes,
        "net_class": type(adapter.net).__name__,
    }
    if isinstance(adapter, TrigFlowNative):
        desc.update(kind="trigflow", prediction_type="trigflow")
    elif isinstance(adapter, EDMAdapter):
        desc.update(kind="edm", prediction_type=adapter.prediction_type)
    elif isinstance(adapter, DenoiserAdapter):
        desc.update(
            kind="denoiser",
            prediction_type="sample",
            sigma_min=adapter.sigma_min,
            sigma_max=adapter.sigma_max,
        )
    elif isinstance(adapter, ScheduleAdapter):
        desc.update(
            prediction_type=adapter.prediction_type,
            data_scale=adapter.data_scale,
            t_range=list(adapter.t_range),
        )
        sched = adapter.schedule
        if isinstance(sched, FlowSchedule):
            desc["kind"] = "flow"
            desc["schedule"] = {
                "num_train_timesteps": sched.num_train_timesteps,
                "s_min": sched.s_min,
                "s_max": sched.s_max,
            }
        elif isinstance(sched, TabulatedSchedule):
            desc["kind"] = "vp"
            desc["schedule"] = {
                "knot_timestep": sched.knot_timestep.double().cpu().tolist(),
                "knot_lambda": sched.knot_lambda.double().cpu().tolist(),
                "knot_log_alpha": sched.knot_log_alpha.double().cpu().tolist(),
            }
        else:
            raise TypeError(f"cannot describe schedule {type(sched).__name__}")
    else:
        raise TypeError(f"cannot describe adapter {type(adapter).__name__}")
    desc["conditioning"] = CONDITIONING[desc["kind"]]
    if adapter.text_embed_dim is not None:  # prompt embeddings (B, L, D) as the condition
        desc["text_embed_dim"] = int(adapter.text_embed_dim)
    if adapter.native_guidance:
        desc["guidance"] = "native"
    elif adapter.guidance_embedding is not None:
        emb = adapter.guidance_embedding
        desc["guidance"] = "embedding"
        desc["guidance_embedding"] = {
            "num_channels": emb.num_channels,
            "input_scale": emb.input_scale,
            "embed_dim": emb.linear.out_features,
        }
    else:
        desc["guidance"] = "none"
    return desc


def _tabulated(schedule: dict[str, Any]) -> TabulatedSchedule:
    lam = torch.tensor(schedule["knot_lambda"], dtype=torch.float64)
    log_alpha = torch.tensor(schedule["knot_log_alpha"], dtype=torch.float64)
    alphas = torch.exp(log_alpha)
    table = TabulatedSchedule(
        torch.tensor(schedule["knot_timestep"], dtype=torch.float64), alphas, alphas * lam.exp()
    )
    table.knot_lambda.copy_(lam)  # the stored knots exactly, not re-derived through exp/log
    table.knot_log_alpha.copy_(log_alpha)
    return table


def build_adapter(net: nn.Module, desc: dict[str, Any]) -> NetAdapter:
    """Wrap the raw ``net`` as ``desc`` says (inverse of :func:`adapter_description`).

    A guidance embedding is attached zero-initialised; its weights come with the state dict
    (checkpoint) or the exported ``guidance_embedding`` component.
    """
    kind, sd = desc.get("kind"), desc.get("sigma_data")
    if sd is None:
        raise ValueError(f"adapter description lacks sigma_data: {desc}")
    if int(desc.get("format", 1)) > ADAPTER_FORMAT:
        raise ValueError(f"adapter format {desc.get('format')} is newer than {ADAPTER_FORMAT}")
    if kind == "trigflow":
        adapter: NetAdapter = TrigFlowNative(net, float(sd))
    elif kind == "edm":
        adapter = EDMAdapter(net, float(sd), desc.get("prediction_type", "epsilon"))
    elif kind == "denoiser":
        adapter = DenoiserAdapter(net, float(sd), desc["sigma_min"], desc["sigma_max"])
    elif kind in ("vp", "flow"):
        spec = desc["schedule"]
        schedule: nn.Module = FlowSchedule(**spec) if kind == "flow" else _tabulated(spec)
        adapter = ScheduleAdapter(
            net, float(sd), schedule, desc["prediction_type"], float(desc.get("data_scale", 1.0))
        )
    else:
        raise ValueError(
            f"unknown adapter kind {kind!r}; expected trigflow, edm, vp, flow or denoiser"
        )
    guidance = desc.get("guidance", "none")
    if guidance == "embedding":
        spec = desc["guidance_embedding"]
        emb = attach_guidance_embedding(adapter, spec["num_channels"], spec["embed_dim"])
        emb.input_scale = float(spec.get("input_scale", 1.0))
    elif guidance == "native" and not adapter.native_guidance:
        raise ValueError(f"the adapter says guidance='native' but {type(net).__name__} has none")
    return adapter


def _plain(value: Any) -> Any:
    """Plain dicts/lists all the way down (an OmegaConf container in a config pickles as an
    object that ``torch.load(weights_only=True)`` refuses)."""
    if isinstance(value, str) or not isinstance(value, (Mapping, Sequence)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value]


def describe_network(adapter: nn.Module) -> dict[str, Any] | None:
    """What rebuilds ``adapter`` without its source: the raw net's class (dotted path), its
    diffusers config and :func:`adapter_description`. None when the net has no diffusers
    config (``from_config``) or the adapter kind has no description."""
    if not isinstance(adapter, NetAdapter):
        return None
    net = adapter.net
    if not (hasattr(net, "config") and hasattr(type(net), "from_config")):
        return None
    try:
        desc = adapter_description(adapter)
    except TypeError:
        return None
    cls = type(net)
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    return {
        "net_class": f"{cls.__module__}.{cls.__qualname__}",
        "net_config": _plain(config),
        "adapter": _plain(desc),
    }


def build_network(record: dict[str, Any], guidance_embedding: bool = True) -> NetAdapter:
    """Inverse of :func:`describe_network`: a freshly initialised adapter of the same
    architecture (load the weights afterwards). ``guidance_embedding=False`` leaves a
    guidance embedding unattached (the Student attaches its own)."""
    module_name, _, class_name = str(record["net_class"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"cannot import the network class {record['net_class']!r}: {err}"
        ) from None
    net = cls.from_config(record["net_config"])
    desc = dict(record["adapter"])
    if not guidance_embedding and desc.get("guidance") == "embedding":
        desc["guidance"] = "none"
    return build_adapter(net, desc)
