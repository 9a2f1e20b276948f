"""Student wrapper: exact copy of the teacher at init, guidance embedding, logvar head."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from scm_lightning.nets.weighting import LogVarHead
from scm_lightning.student import Student
from scm_lightning.teachers import (
    EDMAdapter,
    FlowSchedule,
    GuidanceEmbedding,
    GuidedTeacher,
    ScheduleAdapter,
    TabulatedSchedule,
    TrigFlowNative,
    attach_guidance_embedding,
)
from scm_lightning.teachers.loading import freeze

C, RES, K = 2, 8, 5  # channels, resolution, class embeddings (4 classes + null)


def assert_same_function(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float64 rounding: a module and its deep copy compute the same function, but
    not always the same bits (9e-16 apart on an AMD EPYC, identical on an Intel Xeon)."""
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Clearly different, far beyond rounding (the counterpart of assert_same_function)."""
    return bool((a - b).abs().max() > 1e-6)


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=RES,
        in_channels=C,
        out_channels=C,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=K,
    ).double()


def make_teacher(kind: str):
    net = tiny_unet()
    if kind == "trigflow":
        model = TrigFlowNative(net, 0.5)
    elif kind == "edm":
        model = EDMAdapter(net, 0.5, "v_prediction")
    elif kind == "vp":
        ac = DDIMScheduler().alphas_cumprod
        model = ScheduleAdapter(net, 0.5, TabulatedSchedule.from_alphas_cumprod(ac), "epsilon")
    else:
        model = ScheduleAdapter(net, 0.5, FlowSchedule(), "flow", data_scale=2.0)
    return freeze(model)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, C, RES, RES, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64)
    return x, t, torch.tensor([0, 3, 1])


@pytest.mark.parametrize("kind", ["trigflow", "edm", "vp", "flow"])
@pytest.mark.parametrize("guidance", [False, True])
def test_student_equals_teacher_at_init(kind, guidance):
    teacher = make_teacher(kind)
    student = Student.from_teacher(teacher, guidance_embedding=guidance)
    x, t, y = batch()
    s = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64) if guidance else None
    with torch.no_grad():
        want = teacher(x, t, y)
        got = student(x, t, y, guidance=s)
    assert_same_function(got, want)
    assert want.abs().mean() > 0.1
    assert (student.net.guidance_embedding is not None) == guidance
    assert student.sigma_data == teacher.sigma_data
    # trainable copy, teacher untouched and still frozen
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        next(student.net.net.parameters()).add_(1.0)
        assert differs(student(x, t, y, guidance=s), want)
        assert torch.equal(teacher(x, t, y), want)  # the same call repeated: same bits


def test_guided_teacher_is_unwrapped():
    teacher = make_teacher("edm")
    student = Student.from_teacher(GuidedTeacher(teacher, 2.0, K - 1), guidance_embedding=True)
    x, t, y = batch()
    with torch.no_grad():
        assert_same_function(student(x, t, y, guidance=torch.full((3,), 2.0)), teacher(x, t, y))


def test_guidance_embedding_is_live_and_trainable():
    student = Student.from_teacher(make_teacher("vp"), guidance_embedding=True)
    emb = student.net.guidance_embedding
    assert isinstance(emb, GuidanceEmbedding)
    assert emb.linear.out_features == student.net.net.time_embedding.linear_2.out_features
    assert torch.count_nonzero(emb.linear.weight) == 0 and torch.count_nonzero(emb.linear.bias) == 0
    x, t, y = batch()
    s1, s2 = torch.ones(3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    loss = student(x, t, y, guidance=s2).square().mean()
    loss.backward()
    assert emb.linear.weight.grad.abs().sum() > 0  # the hook puts E(s) on the gradient path
    with torch.no_grad():
        emb.linear.weight.normal_(std=0.1)
        out1, out2 = student(x, t, y, guidance=s1), student(x, t, y, guidance=s2)
    assert (out1 - out2).abs().max() > 1e-4
    # the guidance state does not leak: the raw diffusers net alone is the un-guided net
    with torch.no_grad():
        raw = student.net.net(x, torch.zeros(3, dtype=torch.float64), class_labels=y).sample
        plain = copy.deepcopy(student.net.net)
        plain._forward_hooks.clear()
        for m in plain.modules():
            m._forward_hooks.clear()
        assert_same_function(
            raw, plain(x, torch.zeros(3, dtype=torch.float64), class_labels=y).sample
        )


def test_deepcopy_rebinds_hook_to_the_copy():
    student = Student.from_teacher(make_teacher("edm"), guidance_embedding=True)
    with torch.no_grad():
        student.net.guidance_embedding.linear.weight.normal_(std=0.1)
    clone = copy.deepcopy(student)
    x, t, y = batch()
    s = torch.full((3,), 1.5, dtype=torch.float64)
    with torch.no_grad():
        before = student(x, t, y, guidance=s)
        assert_same_function(clone(x, t, y, guidance=s), before)
        clone.net.guidance_embedding.linear.weight.zero_()
        assert torch.equal(student(x, t, y, guidance=s), before)  # same module, same call
        assert differs(clone(x, t, y, guidance=s), before)


def test_jvp_through_student_with_guidance():
    student = Student.from_teacher(make_teacher("edm"), guidance_embedding=True)
    with torch.no_grad():
        student.net.guidance_embedding.linear.weight.normal_(std=0.1)
    x, t, y = batch()
    s = torch.full((3,), 1.5, dtype=torch.float64)
    dx = torch.randn_like(x)

    def f(a):
        return student.net(a, t, y, s)

    with sdpa_kernel(SDPBackend.MATH):
        _, tangent = torch.func.jvp(f, (x,), (dx,))
        h = 1e-6
        with torch.no_grad():
            fd = (f(x + h * dx) - f(x - h * dx)) / (2 * h)
    assert torch.allclose(tangent, fd, rtol=1e-6, atol=1e-7)


class NativeGuidanceNet(nn.Module):
    supports_guidance_input = True

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1, dtype=torch.float64)
        self.config = {"in_channels": C, "sample_size": RES}
        self.seen = None

    def forward(self, x, timestep, class_labels=None, guidance=None):
        self.seen = guidance
        g = 0.0 if guidance is None else guidance[:, None, None, None] - 1.0
        return self.conv(x) * (1 + g) + timestep[:, None, None, None]


def test_native_guidance_is_passed_through():
    teacher = freeze(TrigFlowNative(NativeGuidanceNet(), 0.5))
    student = Student.from_teacher(teacher, guidance_embedding=True)
    assert student.net.guidance_embedding is None and student.guidance_input
    x, t, _ = batch()
    s = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        out = student(x, t, guidance=s)
    assert student.net.net.seen is s
    with torch.no_grad():
        assert_same_function(out, teacher(x, t, guidance=s))
        assert differs(out, student(x, t, guidance=torch.ones(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="natively"):
        attach_guidance_embedding(student.net)


def test_logvar_head():
    student = Student.from_teacher(make_teacher("trigflow"), logvar_channels=64)
    assert isinstance(student.logvar, LogVarHead) and student.logvar.num_channels == 64
    t = torch.tensor([0.1, 1.0, 1.5])
    assert torch.equal(student.logvar(t), torch.zeros(3))  # zero-initialised: exactly 0
    names = {n.split(".")[0] for n, _ in student.named_parameters()}
    assert names == {"net", "logvar"}


def test_student_errors():
    x, t, y = batch()
    plain = Student.from_teacher(make_teacher("edm"), guidance_embedding=False)
    with pytest.raises(ValueError, match="no guidance input and no guidance embedding"):
        plain(x, t, y, guidance=torch.ones(3))
    guided = Student.from_teacher(make_teacher("edm"), guidance_embedding=True)
    with pytest.raises(ValueError, match="pass guidance"):
        guided(x, t, y)
    with pytest.raises(ValueError, match="shape"):
        guided(x, t, y, guidance=torch.ones(2))
    no_temb = freeze(TrigFlowNative(nn.Conv2d(C, C, 1), 0.5))
    with pytest.raises(ValueError, match="no `time_embedding`"):
        Student.from_teacher(no_temb, guidance_embedding=True)
    with pytest.raises(TypeError, match="TrigFlowModel"):
        Student.from_teacher(nn.Linear(2, 2))


def trigflow_unet(guidance_embedding: bool):
    from scm_lightning.nets.trigflow_unet import TrigFlowUNet

    torch.manual_seed(0)
    net = TrigFlowUNet(
        sample_size=RES,
        in_channels=C,
        out_channels=C,
        block_channels=(8, 16),
        attention_head_dim=8,
        norm_num_groups=4,
        num_classes=K - 1,
        guidance_embedding=guidance_embedding,
    )
    with torch.no_grad():  # TrigFlowUNet may zero-init its output layer: make F non-trivial
        for p in net.parameters():
            if torch.count_nonzero(p) == 0 and p is not getattr(net.guidance_proj, "weight", None):
                p.normal_(std=0.1)
    return net.double()


@pytest.mark.parametrize("native", [False, True])
def test_trigflow_unet_student_equals_teacher(native):
    teacher = freeze(TrigFlowNative(trigflow_unet(native), 0.5))
    assert teacher.native_guidance == native
    student = Student.from_teacher(teacher, guidance_embedding=True)
    assert (student.net.guidance_embedding is None) == native
    assert student.num_classes == K - 1 and student.in_channels == C
    x, t, y = batch()
    s = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    with torch.no_grad():
        want = teacher(x, t, y, guidance=torch.ones(3, dtype=torch.float64) if native else None)
        assert want.abs().mean() > 1e-3
        assert_same_function(student(x, t, y, guidance=s), want)


def _dropout_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def _teachers_with_dropout() -> dict[str, TrigFlowNative]:
    """A diffusers UNet2DModel (resnets + attention) and a TrigFlowUNet, both at dropout 0.1."""
    from scm_lightning.nets.trigflow_unet import TrigFlowUNet

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=RES,
        in_channels=C,
        out_channels=C,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        dropout=0.1,
    )
    trig = TrigFlowUNet(
        sample_size=RES,
        in_channels=C,
        out_channels=C,
        block_channels=(8, 16),
        attention_head_dim=8,
        norm_num_groups=4,
        dropout=0.1,
    )
    with torch.no_grad():  # undo TrigFlowUNet's zero-initialised output layer
        for p in trig.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(std=0.1)
    return {
        "diffusers": freeze(TrigFlowNative(unet, 0.5)),
        "trigflow_unet": freeze(TrigFlowNative(trig, 0.5)),
    }


@pytest.mark.parametrize("kind", ["diffusers", "trigflow_unet"])
@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_student_dropout_is_its_own_on_every_layer(kind, rate):
    """student.dropout, not the teacher's rate, on every dropout layer of the copy (issue 10)."""
    from diffusers.models.attention_processor import Attention

    teacher = _teachers_with_dropout()[kind]
    teacher_rates = [m.p for m in _dropout_layers(teacher)]
    assert 0.1 in teacher_rates
    student = Student.from_teacher(teacher, dropout=rate)
    layers = _dropout_layers(student.net)
    # resnet dropouts and every attention's to_out[1]
    attns = [m for m in student.net.modules() if isinstance(m, Attention)]
    assert len(attns) >= 2 and len(layers) > len(attns)
    assert all(m.p == rate for m in layers)
    assert all(a.dropout == rate for a in attns)
    assert student.net.net.config.dropout == rate  # an export reports the trained rate
    # the frozen teacher keeps its own
    assert [m.p for m in _dropout_layers(teacher)] == teacher_rates
    assert teacher.net.config.dropout == 0.1
    # and the rate is live: in training mode two calls differ iff rate > 0
    x, t, _ = batch()
    student.float().train()
    with torch.no_grad():
        a, b = student(x.float(), t.float()), student(x.float(), t.float())
    assert differs(a, b) == (rate > 0)


def test_student_dropout_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        Student.from_teacher(make_teacher("trigflow"), dropout=1.0)
