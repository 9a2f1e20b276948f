"""Class-conditional evaluation draws labels one way everywhere (issue 10, item 2).

The FID callback, the sample grids, the end-of-fit evaluation and the ``evaluate`` /
``sample`` commands all draw labels with :func:`sampling.draw_class_labels` (uniform over
classes, or the training labels' frequencies), never the unconditional null label.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn

from scm_lightning import commands
from scm_lightning.callbacks.fid import FIDCallback
from scm_lightning.callbacks.samples import SampleGrid
from scm_lightning.data.base import class_label_probs
from scm_lightning.data.digits import DigitsDataModule
from scm_lightning.evaluation import final_quality
from scm_lightning.sampling import class_label_rows, draw_class_labels

K = 10


def test_draw_class_labels_uniform_and_from_a_distribution() -> None:
    assert draw_class_labels(5, None) is None and draw_class_labels(5, 0) is None
    a = draw_class_labels(20_000, K, torch.Generator().manual_seed(0))
    b = draw_class_labels(20_000, K, torch.Generator().manual_seed(0))
    assert a.dtype == torch.long and torch.equal(a, b)  # same RNG, same process: same labels
    freq = torch.bincount(a, minlength=K).double() / a.numel()
    assert a.min() >= 0 and a.max() < K and (freq - 1 / K).abs().max() < 0.01  # 4.5 sigma
    probs = torch.tensor([0.0, 0.7, 0.0, 0.3] + [0.0] * 6, dtype=torch.float64)
    c = draw_class_labels(20_000, K, torch.Generator().manual_seed(1), probs)
    freq = torch.bincount(c, minlength=K).double() / c.numel()
    assert set(c.unique().tolist()) == {1, 3} and abs(freq[1] - 0.7) < 0.015
    with pytest.raises(ValueError, match="class_probs"):
        draw_class_labels(3, K, None, torch.ones(3))
    assert class_label_rows(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


def test_data_label_distribution_is_the_training_labels_frequencies() -> None:
    dm = DigitsDataModule(batch_size=8, seed=0, val_size=8, num_workers=0, conditional=True)
    probs = class_label_probs("data", dm, K)
    labels = torch.stack([dm.base_dataset()[i][1] for i in range(dm.num_images)])
    want = torch.bincount(labels, minlength=K).double() / dm.num_images
    torch.testing.assert_close(probs, want, rtol=0, atol=1e-15)
    assert (
        class_label_probs("uniform", dm, K) is None and class_label_probs("data", dm, None) is None
    )
    with pytest.raises(ValueError, match=r"eval\.labels='balanced'"):
        class_label_probs("balanced", dm, K)


class RecordingModule(nn.Module):
    """Stands in for a LightningModule: records the labels every sampler is called with and
    returns images that depend on the noise generator only."""

    def __init__(self, num_classes: int | None = K, with_teacher: bool = True) -> None:
        super().__init__()
        self.student = SimpleNamespace(num_classes=num_classes, parameters=lambda: iter(()))
        if with_teacher:
            self.teacher = nn.Identity()
        self.calls: list[tuple[str, Tensor | None]] = []
        self.device = torch.device("cpu")

    def _images(self, n: int, generator: torch.Generator | None) -> Tensor:
        return (torch.rand((n, 1, 8, 8), generator=generator) * 2 - 1).clamp(-1, 1)

    def sample(self, n: int, nfe: int = 1, generator=None, class_labels=None, **_) -> Tensor:
        self.calls.append(("sample", class_labels))
        return self._images(n, generator)

    def teacher_sample(self, n: int, nfe: int = 2, generator=None, class_labels=None, **_):
        self.calls.append(("teacher", class_labels))
        return self._images(n, generator)


def _dm_with_labels(labels: Tensor) -> SimpleNamespace:
    dataset = SimpleNamespace(labels=labels)
    return SimpleNamespace(base_dataset=lambda: dataset, num_classes=K)


def test_sample_grid_uses_labels_and_writes_a_per_class_grid(tmp_path: Path) -> None:
    module = RecordingModule()
    trainer = SimpleNamespace(
        is_global_zero=True, callbacks=[], datamodule=None, global_step=0, loggers=[]
    )
    SampleGrid(str(tmp_path), nfes=(1,), num_samples=6, per_class=3).on_fit_end(trainer, module)
    (_, drawn), (_, rows) = module.calls
    want = draw_class_labels(6, K, torch.Generator().manual_seed(1234))  # the grid's seed
    assert drawn is not None and torch.equal(drawn, want)
    assert torch.equal(rows, torch.arange(K).repeat_interleave(3))  # one row per class
    grid = Image.open(tmp_path / "samples_final_nfe1_per_class.png")
    scale, pad = 4, 1  # images.save_grid: 3 per row, K rows of 8-px samples
    assert grid.size == (scale * (3 * 9 + pad), scale * (K * 9 + pad))
    # unconditional: no labels, no per-class grid
    plain = RecordingModule(num_classes=None)
    SampleGrid(str(tmp_path / "u"), nfes=(1,), num_samples=4).on_fit_end(trainer, plain)
    assert plain.calls == [("sample", None)]
    assert not list((tmp_path / "u").glob("*per_class*"))


def test_final_quality_evaluate_and_fid_draw_the_same_labels(tmp_path: Path) -> None:
    """Student and teacher are scored with labels (never the null branch), and the ``evaluate``
    command (commands._batched) draws the very same labels for the same seed and batch size."""
    dm = DigitsDataModule(batch_size=8, seed=0, val_size=8, num_workers=0, conditional=True)
    module = RecordingModule()
    trainer = SimpleNamespace(callbacks=[], is_global_zero=True)
    cfg = OmegaConf.create(
        {"eval": {"feature": "digits", "num_samples": 10, "batch_size": 4, "seed": 3,
                  "student_nfes": [1], "teacher_nfes": [2], "teacher_grids": ["edm"],
                  "labels": "uniform"}}
    )  # fmt: skip
    final_quality(cfg, module, dm, trainer)
    teacher = torch.cat([lab for who, lab in module.calls if who == "teacher"])
    student = torch.cat([lab for who, lab in module.calls if who == "sample"])
    assert teacher.shape == (10,) and torch.equal(teacher, student)
    _, labels = commands._batched(
        lambda n, g, lab: module._images(n, g), 10, 4, 3, None, torch.device("cpu"), K
    )
    assert torch.equal(labels, student)
    # "data": labels follow the data's label distribution (here: only class 7)
    module.calls.clear()
    only_sevens = _dm_with_labels(torch.full((50,), 7))
    cfg.eval.labels = "data"
    fake_dm = SimpleNamespace(
        base_dataset=only_sevens.base_dataset, reference_images=dm.reference_images
    )
    final_quality(cfg, module, fake_dm, trainer)
    assert all(torch.equal(lab, torch.full_like(lab, 7)) for _, lab in module.calls)
    # the FID callback draws with the same helper, in "data" mode too
    module.calls.clear()
    fid = FIDCallback(nfes=(1,), num_samples=4, batch_size=4, labels="data", seed=5,
                      ref_cache_dir=str(tmp_path))  # fmt: skip
    fid_trainer = SimpleNamespace(global_rank=0, world_size=1, callbacks=[], global_step=0,
                                  is_global_zero=True,
                                  datamodule=dm)  # fmt: skip
    fid_trainer.datamodule = SimpleNamespace(
        num_classes=K, base_dataset=only_sevens.base_dataset, config_key=dm.config_key,
        reference_images=dm.reference_images, num_images=dm.num_images,
    )  # fmt: skip
    fid.evaluate(fid_trainer, module)
    ((_, lab),) = module.calls
    assert torch.equal(lab, torch.full((4,), 7))


def test_sample_command_draws_labels_with_the_shared_helper() -> None:
    """``sample``/``evaluate`` without ``labels=`` draw them per batch from the sampling RNG
    (as the end-of-fit evaluation does) and return them for the ``.npz``; given ones pass."""
    _, labels = commands._batched(
        lambda n, g, lab: torch.zeros(n, 1, 8, 8), 7, 3, 0, None, torch.device("cpu"), K
    )
    gen = torch.Generator().manual_seed(0)
    want = torch.cat([draw_class_labels(n, K, gen) for n in (3, 3, 1)])
    assert torch.equal(labels, want)
    given = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    _, same = commands._batched(
        lambda n, g, lab: torch.zeros(n, 1, 8, 8), 7, 3, 0, given, torch.device("cpu"), K
    )
    assert torch.equal(same, given)


def test_teacher_rows_are_cached_by_teacher_weights_and_settings(tmp_path: Path) -> None:
    """The frozen teacher's FD rows are read back from ``eval.cache_dir`` when the teacher's
    weights and every sampler setting match, and recomputed when any of them changes."""
    dm = DigitsDataModule(batch_size=8, seed=0, val_size=8, num_workers=0, conditional=True)
    module = RecordingModule()
    module.teacher = nn.Linear(3, 3)
    module.image_shape, module.t_mid = (1, 8, 8), 1.1
    module.guidance_scale_range, module.uncond_label, module.eval_guidance = None, None, 1.0
    cfg = OmegaConf.create(
        {"eval": {"feature": "digits", "num_samples": 10, "batch_size": 4, "seed": 3,
                  "student_nfes": [1], "teacher_nfes": [3, 2],
                  "teacher_grids": ["edm", "uniform"], "cache_dir": str(tmp_path / "cache")}}
    )  # fmt: skip
    trainer = SimpleNamespace(callbacks=[], is_global_zero=True)

    def teacher_calls() -> int:
        return sum(who == "teacher" for who, _ in module.calls)

    first = final_quality(cfg, module, dm, trainer)
    computed = teacher_calls()
    assert computed > 0 and len(list((tmp_path / "cache").glob("samples-*.npz"))) == 4
    module.calls.clear()
    again = final_quality(cfg, module, dm, trainer)
    assert teacher_calls() == 0 and any(who == "sample" for who, _ in module.calls)
    teacher_keys = [k for k in first if k.startswith(("fd_teacher", "teacher_grid"))]
    assert teacher_keys and all(again[k] == first[k] for k in teacher_keys)
    module.calls.clear()
    cfg.eval.seed = 4  # another seed: other samples
    final_quality(cfg, module, dm, trainer)
    assert teacher_calls() == computed
    module.calls.clear()
    with torch.no_grad():
        module.teacher.weight.add_(1e-3)  # another teacher
    cfg.eval.seed = 3
    final_quality(cfg, module, dm, trainer)
    assert teacher_calls() == computed
