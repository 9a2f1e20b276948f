"""Teacher adapters against diffusers' own schedulers, finite differences and round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    SCMScheduler,
    UNet2DModel,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from scm_lightning.teachers import (
    EDMAdapter,
    FlowSchedule,
    GuidedTeacher,
    ScheduleAdapter,
    TabulatedSchedule,
    TrigFlowNative,
    check_teacher_matches_data,
    load_teacher,
)
from scm_lightning.trigflow import velocity_from_x0

C, RES = 2, 8


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = UNet2DModel(
        sample_size=RES,
        in_channels=C,
        out_channels=C,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )
    return net.to(dtype).eval()


class PlainNet(nn.Module):
    """A float64-exact net of (x, timestep): smooth in both, no float32 time embedding."""

    def __init__(self, time_scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(C, C, 3, padding=1, dtype=torch.float64)
        self.a = nn.Parameter(torch.randn(C, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(C, dtype=torch.float64))
        self.time_scale = time_scale
        self.config = {"in_channels": C, "sample_size": RES}

    def forward(self, x, timestep, class_labels=None):
        tau = (timestep.to(torch.float64) / self.time_scale)[:, None, None, None]
        a, b = self.a[None, :, None, None], self.b[None, :, None, None]
        return self.conv(torch.tanh(x)) * torch.cos(a * tau) + torch.sin(b * tau + x)


def rand(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, RES, RES, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- EDM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma_data", [0.5, 0.8])
def test_edm_adapter_matches_diffusers_preconditioning(prediction_type, sigma_data):
    net = tiny_unet()
    sched = EDMEulerScheduler(sigma_data=sigma_data, prediction_type=prediction_type)
    adapter = EDMAdapter(net, sigma_data, prediction_type)
    t = torch.tensor([0.2, 0.9, 1.45], dtype=torch.float64)
    x_t = sigma_data * rand()
    sigma = sigma_data * torch.tan(t)
    s4 = sigma[:, None, None, None]
    x_sigma = x_t / torch.cos(t)[:, None, None, None]
    with torch.no_grad():
        f_edm = net(sched.precondition_inputs(x_sigma, s4), sched.precondition_noise(sigma)).sample
        d_edm = sched.precondition_outputs(x_sigma, f_edm, s4)
        expected = (torch.cos(t)[:, None, None, None] * x_t - d_edm) / s4.div(
            sigma_data
        ).atan().sin()
        got = adapter.velocity(x_t, t)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9)
    assert got.abs().mean() > 0.1


def test_edm_adapter_finite_at_extremes():
    adapter = EDMAdapter(tiny_unet(), 0.5)
    t = torch.tensor([0.0, 1e-4, math.pi / 2 - 1e-4, math.pi / 2], dtype=torch.float64)
    with torch.no_grad():
        assert torch.isfinite(adapter(rand(4), t)).all()
        # float32 π/2 rounds above π/2 (tan < 0): still finite thanks to the clamp
        assert torch.isfinite(adapter(rand(4), t.float())).all()


# ---------------------------------------------------------------- VP / DDIM and flow


def ddim(prediction_type):
    sched = DDIMScheduler(
        num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type
    )
    sched.set_timesteps(50)
    return sched


def vp_adapter(net, prediction_type, sched, sigma_data=0.5):
    schedule = TabulatedSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    return ScheduleAdapter(net, sigma_data, schedule, prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_adapter_matches_ddim_x0(prediction_type):
    net, sched, sd = tiny_unet(), ddim(prediction_type), 0.5
    adapter = vp_adapter(net, prediction_type, sched, sd)
    k = sched.timesteps[[10, 25, 40]]  # trained integer timesteps 781, 481, 181
    ac = sched.alphas_cumprod.double()[k]
    t = torch.atan(torch.sqrt((1 - ac) / ac) / sd)  # σ_d tan t = σ/α at timestep k
    x_t = sd * rand()
    x_s = ac.sqrt()[:, None, None, None] * x_t / torch.cos(t)[:, None, None, None]
    with torch.no_grad():
        out = net(x_s, k.double()).sample
        x0 = torch.cat(
            [
                sched.step(out[i : i + 1], int(k[i]), x_s[i : i + 1]).pred_original_sample
                for i in range(3)
            ]
        )
        expected = velocity_from_x0(x_t, t, x0) / sd
        got = adapter(x_t / sd, t)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.abs().mean() > 0.1


@pytest.mark.parametrize("data_scale", [1.0, 2.0])
def test_flow_adapter_matches_flow_match_euler(data_scale):
    net, sd = tiny_unet(), 0.5
    adapter = ScheduleAdapter(net, sd, FlowSchedule(1000), "flow", data_scale=data_scale)
    x_t = sd * rand()
    got, expected = [], []
    for i, s in enumerate([0.15, 0.5, 0.9]):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        sched.set_timesteps(sigmas=[s])  # sigmas [s, 0]: one Euler step lands on x0 = x_s − s·v
        sig = sched.sigmas[0].double()
        timestep = sched.timesteps[0]
        assert torch.isclose(timestep.double(), 1000 * sig)  # timestep = σ·num_train_timesteps
        t = torch.atan(sig / (1 - sig) / (data_scale * sd)).reshape(1)
        x_s = (1 - sig) * data_scale * x_t[i : i + 1] / torch.cos(t)
        with torch.no_grad():
            v = net(x_s, timestep.double().reshape(1)).sample
            x0 = sched.step(v, timestep, x_s).prev_sample.double() / data_scale
            expected.append(velocity_from_x0(x_t[i : i + 1], t, x0) / sd)
            got.append(adapter(x_t[i : i + 1] / sd, t))
    assert torch.allclose(torch.cat(got), torch.cat(expected), rtol=1e-4, atol=1e-4)


def test_flow_unit_std_teacher_closed_form():
    """Spec §2: data_scale = 1/σ_d gives s = sin t/(sin t + cos t), input x/(sin t + cos t)."""
    seen = {}

    class Recorder(nn.Module):
        def forward(self, x, timestep, class_labels=None):
            seen["x"], seen["ts"] = x, timestep
            return torch.zeros_like(x)

    sd = 0.5
    adapter = ScheduleAdapter(Recorder(), sd, FlowSchedule(1000), "flow", data_scale=1 / sd)
    t = torch.tensor([0.3, 0.8, 1.3], dtype=torch.float64)
    x = rand()
    adapter(x, t)
    st, ct = torch.sin(t), torch.cos(t)
    assert torch.allclose(seen["ts"], 1000 * st / (st + ct), rtol=1e-12)
    assert torch.allclose(seen["x"], x / (st + ct)[:, None, None, None], rtol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_schedule_adapters_finite_near_ends(prediction_type):
    net = tiny_unet()
    if prediction_type == "flow":
        adapter = ScheduleAdapter(net, 0.5, FlowSchedule(), "flow")
    else:
        adapter = vp_adapter(net, prediction_type, ddim(prediction_type))
    t = torch.tensor([0.0, 1e-4, math.pi / 2 - 1e-4, math.pi / 2], dtype=torch.float64)
    with torch.no_grad():
        out = adapter(rand(4), t)
    assert torch.isfinite(out).all()
    assert out.abs().max() < 1e3


def test_vp_clamps_to_trained_range():
    sched = ddim("epsilon")
    adapter = vp_adapter(tiny_unet(), "epsilon", sched)
    t_lo, t_hi = adapter.t_range
    ac = sched.alphas_cumprod.double()
    assert math.isclose(0.5 * math.tan(t_lo), math.sqrt((1 - ac[0]) / ac[0]), rel_tol=1e-12)
    assert math.isclose(0.5 * math.tan(t_hi), math.sqrt((1 - ac[-1]) / ac[-1]), rel_tol=1e-9)
    x = rand(2)
    with torch.no_grad():
        below = adapter(x, torch.tensor([1e-4, 1e-6], dtype=torch.float64))
        at_lo = adapter(x, torch.full((2,), t_lo, dtype=torch.float64))
    torch.testing.assert_close(below, at_lo, rtol=1e-12, atol=1e-12)  # clamped to t_lo


# ---------------------------------------------------------------- JVP vs finite differences


def adapters_plain():
    sched = ddim("epsilon")
    schedule = TabulatedSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    return {
        "trigflow": TrigFlowNative(PlainNet(1.0), 0.5),
        "edm": EDMAdapter(PlainNet(1.0), 0.5, "epsilon"),
        "vp_eps": ScheduleAdapter(PlainNet(300.0), 0.5, schedule, "epsilon"),
        "vp_v": ScheduleAdapter(PlainNet(300.0), 0.5, schedule, "v_prediction"),
        "flow": ScheduleAdapter(PlainNet(300.0), 0.5, FlowSchedule(), "flow", data_scale=2.0),
    }


@pytest.mark.parametrize("name", ["trigflow", "edm", "vp_eps", "vp_v", "flow"])
def test_jvp_matches_central_differences(name):
    model = adapters_plain()[name]
    x = rand(2)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    dx, dt = rand(2, seed=5), torch.tensor([0.7, -1.3], dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda a, b: model(a, b), (x, t), (dx, dt))
    h = 1e-6
    with torch.no_grad():
        fd = (model(x + h * dx, t + h * dt) - model(x - h * dx, t - h * dt)) / (2 * h)
    assert torch.allclose(tangent, fd, rtol=1e-6, atol=1e-6)
    assert tangent.abs().mean() > 1e-2


def test_jvp_through_diffusers_unet_float32_time_embedding():
    """Real UNet: the x-direction is float64-exact; ∂_t only float32-accurate (field notes)."""
    sched = ddim("v_prediction")
    model = vp_adapter(tiny_unet(), "v_prediction", sched)
    x, t = rand(2), torch.tensor([0.5, 1.2], dtype=torch.float64)
    dx = rand(2, seed=7)
    # diffusers' mid-block attention: fused SDPA kernels have no forward-AD rule (field notes)
    with sdpa_kernel(SDPBackend.MATH):
        _, tx = torch.func.jvp(lambda a: model(a, t), (x,), (dx,))
    h = 1e-6
    with torch.no_grad():
        fd_x = (model(x + h * dx, t) - model(x - h * dx, t)) / (2 * h)
    assert torch.allclose(tx, fd_x, rtol=1e-6, atol=1e-7)
    edm = EDMAdapter(tiny_unet(), 0.5)
    dt = torch.ones(2, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        _, tt = torch.func.jvp(lambda b: edm(x, b), (t,), (dt,))
    h = 1e-3  # large enough that the float32 rounding of c_noise is negligible
    with torch.no_grad():
        fd_t = (edm(x, t + h) - edm(x, t - h)) / (2 * h)
    assert (tt - fd_t).norm() / fd_t.norm() < 2e-3


# ---------------------------------------------------------------- CFG


def test_guided_teacher_equals_two_pass_combination():
    net = tiny_unet(num_class_embeds=4)
    model = EDMAdapter(net, 0.5)
    x, t = rand(3), torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    labels, uncond = torch.tensor([0, 2, 1]), 3
    with torch.no_grad():
        f_c = model(x, t, labels)
        f_u = model(x, t, torch.full((3,), uncond))
        guided = GuidedTeacher(model, 1.7, uncond)
        assert torch.allclose(guided(x, t, labels), f_u + 1.7 * (f_c - f_u), rtol=1e-10, atol=1e-10)
        s = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
        want = f_u + s[:, None, None, None] * (f_c - f_u)
        assert torch.allclose(guided(x, t, labels, guidance=s), want, rtol=1e-10, atol=1e-10)
        assert torch.allclose(guided(x, t, labels, guidance=torch.ones(3)), f_c, atol=1e-10)
        assert not torch.allclose(f_c, f_u)
    with pytest.raises(ValueError, match="class_labels"):
        guided(x, t)


# ---------------------------------------------------------------- loading


def save_pipeline(root, net, sched, sub="unet"):
    net.save_pretrained(root / sub)
    sched.save_pretrained(root / "scheduler")
    return root


CASES = {
    "edm_eps": (lambda: EDMEulerScheduler(sigma_data=0.6), EDMAdapter, "epsilon"),
    "edm_v": (
        lambda: EDMEulerScheduler(prediction_type="v_prediction"),
        EDMAdapter,
        "v_prediction",
    ),
    "vp_v": (
        lambda: DDIMScheduler(prediction_type="v_prediction"),
        ScheduleAdapter,
        "v_prediction",
    ),
    "flow": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), ScheduleAdapter, "flow"),
    "scm": (lambda: SCMScheduler(sigma_data=0.5), TrigFlowNative, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_teacher_round_trip_bit_identical(tmp_path, case):
    make_sched, cls, pred = CASES[case]
    net, sched = tiny_unet(dtype=torch.float32), make_sched()
    save_pipeline(tmp_path, net, sched)
    teacher = load_teacher(tmp_path)
    assert type(teacher) is cls
    assert getattr(teacher, "prediction_type", None) == pred
    assert teacher.sigma_data == sched.config.get("sigma_data", 0.5)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    if cls is EDMAdapter:
        ref = EDMAdapter(net, sched.config.sigma_data, pred)
    elif cls is TrigFlowNative:
        ref = TrigFlowNative(net, 0.5)
    elif pred == "flow":
        ref = ScheduleAdapter(net, 0.5, FlowSchedule(), "flow")
    else:
        ref = ScheduleAdapter(
            net, 0.5, TabulatedSchedule.from_alphas_cumprod(sched.alphas_cumprod), pred
        )
    x, t = rand().float(), torch.tensor([0.05, 0.8, 1.5])
    with torch.no_grad():
        # two instances of one network: equal up to float32 rounding, not bit for bit
        torch.testing.assert_close(teacher(x, t), ref(x, t), rtol=1e-5, atol=1e-6)
    if case != "vp_v":
        return
    # model folder + sibling scheduler folder, and an explicit scheduler config path
    t2 = load_teacher(tmp_path / "unet")
    t3 = load_teacher(
        tmp_path / "unet", scheduler_config=tmp_path / "scheduler" / "scheduler_config.json"
    )
    with torch.no_grad():
        torch.testing.assert_close(t2(x, t), ref(x, t), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t3(x, t), ref(x, t), rtol=1e-5, atol=1e-6)


def test_load_teacher_options(tmp_path):
    net = tiny_unet(dtype=torch.float32)
    save_pipeline(tmp_path, net, DDIMScheduler())
    teacher = load_teacher(tmp_path, prediction_type="sample", sigma_data=0.7, data_scale=2.0)
    assert (teacher.prediction_type, teacher.sigma_data, teacher.data_scale) == ("sample", 0.7, 2.0)
    with pytest.raises(ValueError, match=r"unknown prediction_type 'x0'"):
        load_teacher(tmp_path, prediction_type="x0")
    with pytest.raises(ValueError, match="unknown teacher kind"):
        load_teacher(tmp_path, kind="ve")


def test_load_teacher_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a model"):
        load_teacher(tmp_path)
    net = tiny_unet(dtype=torch.float32)
    net.save_pretrained(tmp_path / "lone")
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        load_teacher(tmp_path / "lone")
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_teacher(tmp_path / "lone", scheduler_config=tmp_path / "nope.json")
    bad = tmp_path / "bad"
    save_pipeline(bad, net, DDIMScheduler())
    cfg = bad / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({"_class_name": "WarpDriveScheduler"}))
    with pytest.raises(ValueError, match="unknown scheduler class 'WarpDriveScheduler'"):
        load_teacher(bad)
    cfg.write_text(json.dumps({"_class_name": "EDMEulerScheduler", "sigma_data": 0.5}))
    with pytest.raises(ValueError, match="differs from the EDM teacher"):
        load_teacher(bad, sigma_data=0.7)
    with pytest.raises(ValueError, match="unknown EDM prediction_type"):
        load_teacher(bad, prediction_type="sample")
    pickled = tmp_path / "pickled"
    net.save_pretrained(pickled / "unet", safe_serialization=False)
    DDIMScheduler().save_pretrained(pickled / "scheduler")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_teacher(pickled)
    assert isinstance(load_teacher(pickled, allow_pickle=True), ScheduleAdapter)


def test_adapter_constructor_errors():
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'"):
        ScheduleAdapter(PlainNet(), 0.5, FlowSchedule(), "noise")
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        TrigFlowNative(PlainNet(), 0.0)
    with pytest.raises(ValueError, match="increase strictly"):
        TabulatedSchedule(torch.arange(3.0), torch.ones(3), torch.tensor([0.3, 0.2, 0.4]))


def test_check_teacher_matches_data():
    teacher = EDMAdapter(tiny_unet(num_class_embeds=11), 0.5)
    check_teacher_matches_data(teacher, C, RES, 10)  # 10 classes + null class
    check_teacher_matches_data(teacher, C, (RES, RES), 11)
    with pytest.raises(ValueError, match="expects 2 input channels, data has 3"):
        check_teacher_matches_data(teacher, 3, RES, 10)
    with pytest.raises(ValueError, match="sample_size is 8, data resolution 16"):
        check_teacher_matches_data(teacher, C, 16, 10)
    with pytest.raises(ValueError, match="class-conditional"):
        check_teacher_matches_data(teacher, C, RES, None)
    with pytest.raises(ValueError, match="11 class embeddings, data 5 classes"):
        check_teacher_matches_data(teacher, C, RES, 5)
    with pytest.raises(ValueError, match="unconditional"):
        check_teacher_matches_data(EDMAdapter(tiny_unet(), 0.5), C, RES, 10)


def test_custom_teacher_target_is_built_by_hydra_and_frozen():
    """A custom ``teacher._target_`` (nested ``_target_`` included) goes through Hydra's
    ``instantiate``; anything but a TrigFlowModel is refused with the wrapping hint."""
    from omegaconf import OmegaConf

    from scm_lightning.config import ConfigError
    from scm_lightning.training import build_teacher

    cfg = OmegaConf.create(
        {
            "_target_": "scm_lightning.teachers.TrigFlowNative",
            "net": {"_target_": "torch.nn.Conv2d", "in_channels": 2, "out_channels": 2,
                    "kernel_size": 1},
            "sigma_data": 0.5,
        }
    )  # fmt: skip
    teacher = build_teacher(cfg)
    assert isinstance(teacher, TrigFlowNative) and isinstance(teacher.net, nn.Conv2d)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ConfigError, match="returned Identity") as info:
        build_teacher(OmegaConf.create({"_target_": "torch.nn.Identity"}))
    assert "wrap a plain module in TrigFlowNative or EDMAdapter" in str(info.value)


def test_guided_velocity_is_sigma_data_times_guided_F():
    from scm_lightning.teachers import guided_velocity

    model = EDMAdapter(tiny_unet(num_class_embeds=4), 0.5)
    x_t, t, labels = (
        0.5 * rand(),
        torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64),
        torch.tensor([0, 2, 1]),
    )
    s = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    with torch.no_grad():
        v_c, v_u = model.velocity(x_t, t, labels), model.velocity(x_t, t, torch.full((3,), 3))
        want = v_u + s[:, None, None, None] * (v_c - v_u)
        assert torch.allclose(guided_velocity(model, x_t, t, labels, s, 3), want, atol=1e-10)


def test_load_trigflow_unet_folder(tmp_path):
    from scm_lightning.nets.trigflow_unet import TrigFlowUNet

    torch.manual_seed(0)
    net = TrigFlowUNet(
        sample_size=RES,
        in_channels=C,
        out_channels=C,
        block_channels=(8, 16),
        attention_head_dim=8,
        norm_num_groups=4,
    )
    net.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="no sigma_data"):
        load_teacher(tmp_path)  # no scheduler: TrigFlow needs sigma_data from somewhere
    teacher = load_teacher(tmp_path, sigma_data=0.5)
    assert isinstance(teacher, TrigFlowNative) and isinstance(teacher.net, TrigFlowUNet)
    x, t = rand().float(), torch.tensor([0.1, 0.8, 1.5])
    with torch.no_grad():
        ref = TrigFlowNative(net.eval(), 0.5)(x, t)
        torch.testing.assert_close(teacher(x, t), ref, rtol=1e-5, atol=1e-6)
