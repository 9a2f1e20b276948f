"""Fréchet distance, feature networks, reference cache and the FID callback."""

from __future__ import annotations

import urllib.error

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scm_lightning.callbacks.ema import EMA
from scm_lightning.callbacks.fid import FIDCallback
from scm_lightning.data.digits import DigitsDataModule, load_digits_tensors
from scm_lightning.metrics import (
    FeatureStats,
    InceptionFeatures,
    accumulate_stats,
    build_feature_extractor,
    cached_reference_stats,
    frechet_distance,
    frechet_distance_from_stats,
    load_digits_classifier,
)


def scipy_fd(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / TTUR reference formula with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def stats_of(x: torch.Tensor, chunk: int = 37) -> FeatureStats:
    s = FeatureStats(x.shape[1])
    for start in range(0, x.shape[0], chunk):
        s.update(x[start : start + chunk])
    return s


def test_frechet_distance_matches_scipy_and_numpy_moments() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 32))
    b = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32)) * 0.4 + 0.3
    sa, sb = stats_of(torch.from_numpy(a)), stats_of(torch.from_numpy(b))
    np.testing.assert_allclose(sa.mean(), a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sa.cov(), np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)
    expected = scipy_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance_from_stats(sa, sb) == pytest.approx(expected, rel=1e-9)
    assert expected > 1.0
    # Identical distributions: 0, never negative; merging halves equals one pass.
    assert 0.0 <= frechet_distance_from_stats(sa, sa) < 1e-9
    half = stats_of(torch.from_numpy(a[:300])).merge(stats_of(torch.from_numpy(a[300:])))
    np.testing.assert_allclose(half.cov(), sa.cov(), rtol=1e-12)
    # Rank-deficient covariances (fewer samples than dimensions) stay finite and agree.
    c, d = rng.normal(size=(20, 32)), rng.normal(size=(25, 32)) + 0.1
    mc, cc, md, cd = c.mean(0), np.cov(c, rowvar=False), d.mean(0), np.cov(d, rowvar=False)
    assert frechet_distance(mc, cc, md, cd) == pytest.approx(scipy_fd(mc, cc, md, cd), rel=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mc, cc, md[:3], cd)


class FlatFeatures(nn.Flatten):
    num_features = 4  # 1×2×2 images -> 4 features


def test_accumulate_stats_embeds_clamped_batches() -> None:
    """The one embedding path: clamp to [-1, 1], feature net, float64 sums; empty batches
    (a DDP rank without a share) are skipped."""
    g = torch.Generator().manual_seed(0)
    images = 1.5 * torch.randn(50, 1, 2, 2, generator=g)  # partly outside [-1, 1]
    batches = [images[:20], images[20:20], images[20:]]
    stats = accumulate_stats(batches, FlatFeatures(), "cpu")
    x = images.clamp(-1, 1).flatten(1).double().numpy()
    assert stats.n == 50
    np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-14)
    empty = accumulate_stats([images[:0]], FlatFeatures(), "cpu")  # width from num_features
    assert empty.n == 0 and empty.sum.shape == (4,)
    with pytest.raises(ValueError, match="no images"):
        accumulate_stats([], nn.Flatten(), "cpu")


def test_final_evaluation_and_evaluate_share_one_fd() -> None:
    """End-of-fit figures (evaluation) and `evaluate` (commands) give the same FD as scipy on
    the clamped features of the same images."""
    from scm_lightning import commands, evaluation

    g = torch.Generator().manual_seed(1)
    gen_images = 1.2 * torch.randn(64, 1, 2, 2, generator=g) + 0.2
    ref_images = torch.randn(80, 1, 2, 2, generator=g).clamp(-1, 1)
    net = FlatFeatures()

    def sampler(n: int, generator: torch.Generator) -> torch.Tensor:
        done = sampler.done
        sampler.done += n
        return gen_images[done : done + n]

    sampler.done = 0
    final = frechet_distance_from_stats(
        evaluation.sampled_stats(sampler, 64, 24, 0, net, torch.device("cpu")),
        evaluation.reference_stats(ref_images, 24, net, torch.device("cpu")),
    )
    gen_f = commands._features(net, gen_images, 24, torch.device("cpu"))
    ref_f = commands._features(net, ref_images, 24, torch.device("cpu"))
    opts = {"kid_subsets": 2, "kid_subset_size": 16, "pr_k": 3}
    scores = commands._scores(gen_f, ref_f, opts, seed=0)
    a, b = gen_images.clamp(-1, 1).flatten(1).double().numpy(), ref_images.flatten(1).numpy()
    expected = scipy_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert final == pytest.approx(expected, rel=1e-8)
    assert scores["fd"] == pytest.approx(expected, rel=1e-8)


def test_digits_classifier_and_fd_on_digits() -> None:
    net = load_digits_classifier()
    x, y = load_digits_tensors()
    with torch.no_grad():
        assert (net.logits(x).argmax(1) == y).float().mean() >= 0.97
        feats = net(x)
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(x), generator=g)
        noise = net(torch.rand(900, 1, 8, 8, generator=g) * 2 - 1)
        upsampled = net(load_digits_tensors(16, "nearest")[0])  # area-pooled back: exact
    assert feats.shape == (1797, 64) and net.feature_id.startswith("digits_classifier-")
    halves = frechet_distance_from_stats(stats_of(feats[perm[:898]]), stats_of(feats[perm[898:]]))
    vs_noise = frechet_distance_from_stats(stats_of(feats[perm[:898]]), stats_of(noise))
    vs_up = frechet_distance_from_stats(stats_of(feats), stats_of(upsampled))
    assert vs_noise > 10 * halves  # measured ≈5.5 vs ≈460
    assert vs_up < 1e-6


def test_reference_stats_cached_once(tmp_path) -> None:
    calls = []
    feats = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))

    def compute() -> FeatureStats:
        calls.append(1)
        return stats_of(feats)

    config = {"dataset": "toy", "n": 100}
    s1, path, computed = cached_reference_stats(tmp_path, config, "net-a", compute)
    mtime = path.stat().st_mtime_ns
    s2, path2, computed2 = cached_reference_stats(tmp_path, config, "net-a", compute)
    assert (computed, computed2, len(calls), path2) == (True, False, 1, path)
    assert path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(s2.cov(), s1.cov())
    _, path3, computed3 = cached_reference_stats(tmp_path, config, "net-b", compute)
    assert computed3 and path3 != path and len(calls) == 2  # feature id is part of the key
    # mu/sigma-only files (pytorch-fid style) load to the same moments.
    np.savez(tmp_path / "plain.npz", mu=s1.mean(), sigma=s1.cov())
    plain = FeatureStats.load(tmp_path / "plain.npz")
    np.testing.assert_allclose(plain.mean(), s1.mean(), rtol=1e-12)
    np.testing.assert_allclose(plain.cov(), s1.cov(), rtol=1e-9, atol=1e-12)
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        FeatureStats.load(tmp_path / "nope.npz")


def test_inception_errors_and_local_weights(tmp_path, monkeypatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    with pytest.raises(
        RuntimeError, match="Inception requested without weights and without network"
    ):
        InceptionFeatures()
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        build_feature_extractor(
            {"name": "inception", "weights_path": str(tmp_path / "missing.pth")}
        )
    # A local weights file (random values with the real layout) is used without any download.
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    state = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    torch.save(state, tmp_path / "w.pth")
    net = build_feature_extractor({"name": "inception", "weights_path": str(tmp_path / "w.pth")})
    out = net(torch.rand(1, 1, 8, 8) * 2 - 1)  # one image: 299 px Inception is slow on CPU
    assert out.shape == (1, 2048) and torch.isfinite(out).all()
    assert net.feature_id.startswith("inception-v3-compat-2048-") and not net.net.use_antialias


# A stand-in for github.com/facebookresearch/dinov2 (no download in tests): same hub entry
# point name, a tiny patch-14 network with DINOv2's `embed_dim` attribute.
FAKE_DINOV2_HUBCONF = """
import torch
from torch import nn


class TinyViT(nn.Module):
    embed_dim = 6

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 6, kernel_size=14, stride=14)
        self.head = nn.Linear(6, 6)

    def forward(self, x):
        return self.head(self.patch_embed(x).mean(dim=(2, 3)))


def dinov2_vits14(pretrained=True):
    assert not pretrained, "the test never downloads"
    return TinyViT()
"""


def fake_dinov2(tmp_path) -> tuple:
    """(repo dir with hubconf.py, weights file, the network those weights define)."""
    import importlib.util

    repo = tmp_path / "hub" / "facebookresearch_dinov2_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(FAKE_DINOV2_HUBCONF)
    spec = importlib.util.spec_from_file_location("fake_dinov2_hubconf", repo / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(3)
    net = module.dinov2_vits14(pretrained=False).eval()
    torch.save(net.state_dict(), tmp_path / "dinov2_vits14_pretrain.pth")
    return repo, tmp_path / "dinov2_vits14_pretrain.pth", net


def test_dinov2_features_from_local_code_and_weights(tmp_path, monkeypatch) -> None:
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    from scm_lightning.metrics.features import DinoV2Features, dinov2_problem

    repo, weights, reference_net = fake_dinov2(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir() -> tmp_path/hub
    net = build_feature_extractor("dinov2", weights_path=weights)
    assert isinstance(net, DinoV2Features) and net.num_features == 6 and not net.training
    assert net.feature_id.startswith("dinov2-vit-s-14-")
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # independently: uint8 like a PNG, RGB, TF1 bilinear to 224 px, ImageNet statistics
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).expand(-1, 3, -1, -1)
    big = interpolate_bilinear_2d_like_tensorflow1x(u8, size=(224, 224), align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        expected = reference_net((big - mean) / std)
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    # the code folder can also be given explicitly
    spec = {"name": "dinov2", "repo_dir": str(repo), "weights_path": str(weights)}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    assert build_feature_extractor(spec).num_features == 6
    # offline problems, each one line
    assert "need a local checkpoint" in dinov2_problem(None, repo)
    assert "not found at" in dinov2_problem(tmp_path / "nope.pth", repo)
    assert "model code is not at" in dinov2_problem(weights, None)
    with pytest.raises(FileNotFoundError, match="need a local checkpoint"):
        build_feature_extractor("dinov2")


def test_dinov2_config_is_checked_before_any_work(tmp_path, monkeypatch) -> None:
    """validate_config names the key: weights missing -> eval.feature_weights; the DINOv2
    code missing -> eval.feature; both present -> accepted (also for the FID callback)."""
    from scm_lightning.config import ConfigError, compose_config, validate_config

    def check(*overrides: str) -> None:
        validate_config(compose_config("fit", ["run_dir=" + str(tmp_path / "run"), *overrides]))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^eval.feature_weights=None is invalid: DINOv2"):
        check("eval.feature=dinov2")
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    with pytest.raises(ConfigError, match=r"^eval.feature_weights='.*' is invalid: DINOv2 weig"):
        check("eval.feature=dinov2", f"eval.feature_weights={weights}")
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^eval.feature='dinov2' is invalid: the DINOv2 model"):
        check("eval.feature=dinov2", f"eval.feature_weights={weights}")
    fake_dinov2(tmp_path / "t")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    check("eval.feature=dinov2", f"eval.feature_weights={weights}")
    with pytest.raises(ConfigError, match=r"^callbacks.fid.feature_weights=None is invalid"):
        check("callbacks.fid.feature=dinov2", "callbacks.fid.feature_weights=null")


@pytest.mark.slow
def test_fit_reports_dinov2_fd_from_the_cli(tmp_path, monkeypatch) -> None:
    """`fit debug=fdr eval.feature=dinov2 eval.feature_weights=PATH`: the end-of-fit FDs are
    measured on the DINOv2 features (code from torch.hub's folder under TORCH_HOME)."""
    import json

    from conftest import run_cli

    _, weights, _ = fake_dinov2(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    run = tmp_path / "run"
    res = run_cli(
        "fit",
        "debug=fdr",
        f"run_dir={run}",
        "eval.feature=dinov2",
        f"eval.feature_weights={weights}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["feature"].startswith("dinov2-vit-s-14-")
    fds = [v for k, v in results.items() if k.startswith("fd_")]  # best rows and every grid's
    headline = [k for k in results if k.startswith("fd_") and k.split("_")[-1].startswith("nfe")]
    assert len(headline) == 4 and all(np.isfinite(fds)) and min(fds) >= 0


def test_build_feature_extractor_specs() -> None:
    assert build_feature_extractor("digits").feature_id.startswith("digits_classifier-")
    ident = build_feature_extractor({"_target_": "torch.nn.Flatten"})
    assert ident.feature_id == "torch.nn.modules.flatten.Flatten" and not ident.training
    with pytest.raises(ValueError, match="cannot import"):
        build_feature_extractor("no_such_pkg.Net")
    with pytest.raises(ValueError, match="'name' or '_target_'"):
        build_feature_extractor({"weights_path": "x"})


class FakeGenerator(L.LightningModule):
    """Stand-in for the distillation module: a linear map from noise to 8×8 images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(16, 64)
        self.teacher = nn.Linear(16, 64).requires_grad_(False)
        self.sigma_data = 0.5
        self.sample_calls = 0

    def sample(self, num_samples, nfe, generator=None, t_mid=1.1, class_labels=None):
        self.sample_calls += 1
        z = torch.randn(num_samples, 16, generator=generator, device=self.device)
        for _ in range(nfe):  # each "step" re-applies the student
            x = torch.tanh(self.student(z))
            z = x[:, :16] + 0.1 * torch.randn(num_samples, 16, generator=generator)
        return x.view(num_samples, 1, 8, 8)

    def training_step(self, batch, batch_idx):
        images, _ = batch
        z = torch.randn(images.shape[0], 16)
        return ((torch.tanh(self.student(z)) - images.flatten(1)) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.student.parameters(), lr=0.05)


def independent_fd(module, ema, callback, nfe, ref_images) -> float:
    """Recompute one logged value by hand: EMA weights, same seed, scipy FD."""
    net = load_digits_classifier()
    with ema.swapped(module), torch.no_grad():
        gen = torch.Generator().manual_seed(callback.seed)
        x = torch.cat(
            [
                module.sample(
                    n, nfe, generator=gen, class_labels=torch.randint(10, (n,), generator=gen)
                )
                for n in (24, 24, 16)  # batch_size 24, num_samples 64
            ]
        )
        f, r = net(x.clamp(-1, 1)).double().numpy(), net(ref_images).double().numpy()
    return scipy_fd(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))


def make_trainer(tmp_path, callbacks, steps=4) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )


def test_fid_callback_in_trainer(tmp_path) -> None:
    cache = tmp_path / "refs"
    kwargs = dict(
        every_n_steps=2,
        nfes=(1, 2),
        num_samples=64,
        batch_size=24,
        ref_batch_size=2048,
        ref_cache_dir=str(cache),
    )
    ema, fid = EMA({"c": {"kind": "constant", "beta": 0.5}}), FIDCallback(**kwargs, at_fit_end=True)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="fid/nfe1", mode="min", every_n_train_steps=2
    )
    module = FakeGenerator()
    trainer = make_trainer(tmp_path, [ema, fid, ckpt], steps=5)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    # Steps 2 and 4 on schedule, step 5 at the end of fit; one history row per NFE.
    assert [(h["step"], h["nfe"]) for h in fid.history] == [
        (s, n) for s in (2, 4, 5) for n in (1, 2)
    ]
    assert fid.ref_computed == 1 and len(list(cache.glob("ref-*.npz"))) == 1
    images = load_digits_tensors()[0]
    for nfe in (1, 2):
        logged = float(trainer.callback_metrics[f"fid/nfe{nfe}"])
        assert logged == pytest.approx(fid.history[-2 + nfe - 1]["fd"])
        assert logged == pytest.approx(independent_fd(module, ema, fid, nfe, images), rel=1e-6)
    nfe1 = [h["fd"] for h in fid.history if h["nfe"] == 1 and h["step"] in (2, 4)]
    assert float(ckpt.best_model_score) == pytest.approx(min(nfe1), rel=1e-6)
    assert (tmp_path / "fid_history.png").stat().st_size > 1000
    # The feature net is not part of the module or its checkpoint.
    assert all(not k.startswith(("body", "head")) for k in module.state_dict())
    saved = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    assert sorted(saved) == ["student.bias", "student.weight", "teacher.bias", "teacher.weight"]
    # A second run reuses the cache; a plain DataLoader (no datamodule) gives the same stats.
    fid2 = FIDCallback(**kwargs)
    make_trainer(tmp_path, [fid2], steps=2).fit(
        FakeGenerator(), datamodule=DigitsDataModule(batch_size=32)
    )
    assert fid2.ref_computed == 0 and len(list(cache.glob("ref-*.npz"))) == 1
    fid3 = FIDCallback(**kwargs, num_classes=None)
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=32)
    make_trainer(tmp_path, [fid3], steps=2).fit(FakeGenerator(), train_dataloaders=loader)
    assert fid3.ref_computed == 1 and len(list(cache.glob("ref-*.npz"))) == 2
    np.testing.assert_allclose(fid3._ref.mean(), fid2._ref.mean(), rtol=1e-9)


@pytest.mark.distributed
def test_fid_callback_ddp_spawn_splits_and_merges(tmp_path) -> None:
    """Two gloo ranks (ddp_spawn also checks the callbacks pickle): 63 samples split 32 + 31."""
    ema = EMA({"now": {"kind": "constant", "beta": 0.0}})  # β = 0: EMA == online weights
    fid = FIDCallback(
        every_n_steps=2,
        nfes=(1,),
        num_samples=63,
        batch_size=20,
        ref_batch_size=2048,
        ref_cache_dir=str(tmp_path / "refs"),
        at_fit_end=False,
    )
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[ema, fid],
        strategy="ddp_spawn",
        devices=2,
        accelerator="cpu",
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = FakeGenerator()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    logged = float(trainer.callback_metrics["fid/nfe1"])
    net, feats = load_digits_classifier(), []
    with torch.no_grad():  # redo both ranks' share by hand with the returned final weights
        for rank, keep in ((0, 32), (1, 31)):
            gen, xs = torch.Generator().manual_seed(fid.seed + rank), []
            for n in (20, 12):
                labels = torch.randint(10, (n,), generator=gen)
                xs.append(module.sample(n, 1, generator=gen, class_labels=labels))
            feats.append(net(torch.cat(xs)[:keep].clamp(-1, 1)))
        f = torch.cat(feats).double().numpy()
        r = net(load_digits_tensors()[0]).double().numpy()
    expected = scipy_fd(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    assert logged == pytest.approx(expected, rel=1e-5)
    assert len(list((tmp_path / "refs").glob("ref-*.npz"))) == 1
