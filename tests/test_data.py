"""Data modules against real files written to tmp_path (PIL images, npz/safetensors/pt)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from scm_lightning.data import DigitsDataModule, ImageFolderDataModule, TensorDataModule


def check_batch(images: torch.Tensor, labels: torch.Tensor, b: int, c: int, r: int) -> None:
    assert images.shape == (b, c, r, r) and images.dtype == torch.float32
    assert labels.shape == (b,) and labels.dtype == torch.int64
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0


def first_batches(dm, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


# --- digits -------------------------------------------------------------------------------
def test_digits_values_match_sklearn_and_contract_attributes():
    dm = DigitsDataModule(batch_size=64)
    assert (dm.channels, dm.resolution, dm.num_classes) == (1, 8, 10)  # before setup
    ref = load_digits()
    images, labels = dm.reference_images(10_000), dm.base_dataset().labels
    assert images.shape == (1797, 1, 8, 8)
    expected = torch.as_tensor(ref.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert torch.equal(labels, torch.as_tensor(ref.target, dtype=torch.int64))
    x, y = next(iter(dm.train_dataloader()))
    check_batch(x, y, 64, 1, 8)
    assert len(dm.train_dataloader()) == 1797 // 64  # incomplete batch dropped


def test_digits_shuffle_is_deterministic_per_seed():
    a = first_batches(DigitsDataModule(batch_size=32, seed=3))
    b = first_batches(DigitsDataModule(batch_size=32, seed=3))
    c = first_batches(DigitsDataModule(batch_size=32, seed=4))
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0])
    # successive epochs of one loader differ, and each new loader replays the same epochs
    dm = DigitsDataModule(batch_size=1797 // 2, seed=3)
    loader = dm.train_dataloader()
    e1, e2 = [torch.cat([y for _, y in loader]) for _ in range(2)]
    assert not torch.equal(e1, e2)
    assert torch.equal(torch.cat([y for _, y in dm.train_dataloader()]), e1)


def test_digits_upsampling_and_unconditional():
    native = DigitsDataModule().reference_images(5000)
    near = DigitsDataModule(resolution=16, upsample="nearest").reference_images(5000)
    assert near.shape == (1797, 1, 16, 16)
    # nearest: every 2×2 block repeats the native pixel
    assert torch.equal(near, native.repeat_interleave(2, -1).repeat_interleave(2, -2))
    bil = DigitsDataModule(resolution=16).reference_images(5000)
    # bilinear (align_corners=False): output pixel 1 = 0.75·p0 + 0.25·p1 along each axis
    p = native[:, 0].double()
    row = 0.75 * p[:, :, 0] + 0.25 * p[:, :, 1]  # column 1 of the 16-px width, per 8 rows
    expected = 0.75 * row[:, 0] + 0.25 * row[:, 1]  # (1, 1) of the 16×16 image
    torch.testing.assert_close(bil[:, 0, 1, 1].double(), expected, rtol=0, atol=1e-6)
    assert float(bil.min()) >= -1 and float(bil.max()) <= 1
    dm = DigitsDataModule(conditional=False, batch_size=16)
    assert dm.num_classes is None
    _, y = next(iter(dm.train_dataloader()))
    assert torch.equal(y, torch.zeros(16, dtype=torch.int64))
    assert dm.config_key() != DigitsDataModule().config_key()


def test_digits_flip_val_reference_and_config_key():
    dm = DigitsDataModule(flip=True, val_size=100, batch_size=50, seed=1)
    ds = dm.train_dataset()
    assert len(ds) == 2 * 1797
    torch.testing.assert_close(ds[1797 + 5][0], torch.flip(ds[5][0], dims=(-1,)))
    # the validation subset and reference images do not depend on the training seed
    other = DigitsDataModule(val_size=100, batch_size=50, seed=2)
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert val.shape == (100, 1, 8, 8)
    assert torch.equal(val, torch.cat([x for x, _ in other.val_dataloader()]))
    assert torch.equal(dm.reference_images(300), other.reference_images(300))
    assert dm.reference_images(300).shape == (300, 1, 8, 8)
    assert dm.config_key() == other.config_key()  # loader settings are not in the key
    assert dm.config_key() != DigitsDataModule(resolution=16).config_key()


def test_digits_workers_match_in_process_loading():
    dm = DigitsDataModule(batch_size=128, seed=5, num_workers=1)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1 and loader.drop_last
    x, y = next(iter(loader))
    x0, y0 = next(iter(DigitsDataModule(batch_size=128, seed=5).train_dataloader()))
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match=r"multiple of 8.*12"):
        DigitsDataModule(resolution=12)
    with pytest.raises(ValueError, match="batch_size=2000 exceeds the 1797"):
        DigitsDataModule(batch_size=2000)
    with pytest.raises(ValueError, match=r"upsample.*'cubic'"):
        DigitsDataModule(resolution=16, upsample="cubic")


# --- image folder ---------------------------------------------------------------------------
def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def solid(h: int, w: int, rgb=(255, 0, 0)) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    save(root / "a.png", solid(16, 16, (255, 0, 0)))
    save(root / "b.JPG", solid(16, 16, (0, 0, 255)), quality=95)
    # 48 wide, 16 high, white in the middle 32 columns: resized to 24×8 and center-cropped to
    # the middle 8 columns (source columns 16..32), far from the black margins
    wide = np.zeros((16, 48, 3), np.uint8)
    wide[:, 8:40] = 255
    save(root / "sub" / "c.webp", wide, lossless=True)
    save(root / "sub" / "d.bmp", solid(24, 24, (0, 255, 0)))
    (root / "notes.txt").write_text("not an image")
    save(root / ".hidden.png", solid(4, 4))
    return root


def test_folder_decodes_crops_and_converts(folder: Path):
    dm = ImageFolderDataModule(folder, resolution=8, batch_size=2, val_size=4)
    assert (dm.channels, dm.resolution, dm.num_classes) == (3, 8, None)
    assert [p.name for p in dm.paths] == ["a.png", "b.JPG", "c.webp", "d.bmp"]
    report = dm.scan()
    assert report.num_ok == 4 and not report.bad
    assert report.sizes == {(16, 16): 2, (48, 16): 1, (24, 24): 1}
    imgs = dm.reference_images(10)
    assert imgs.shape == (4, 3, 8, 8) and imgs.dtype == torch.float32
    torch.testing.assert_close(imgs[0], torch.tensor([1.0, -1, -1])[:, None, None].expand(3, 8, 8))
    assert (imgs[1, 2] > 0.95).all() and (imgs[1, :2] < -0.9).all()  # JPEG blue, ±lossy
    torch.testing.assert_close(imgs[2], torch.ones(3, 8, 8))  # centre crop kept only white
    torch.testing.assert_close(imgs[3, 1], torch.ones(8, 8))
    x, y = next(iter(dm.train_dataloader()))
    check_batch(x, y, 2, 3, 8)
    gray = ImageFolderDataModule(folder, resolution=4, channels=1, batch_size=1)
    g = gray.reference_images(10)[:1]  # all four images, in path order: a.png first
    assert g.shape == (1, 1, 4, 4)
    # PIL's L = (299 R + 587 G + 114 B)/1000: pure red -> 76
    torch.testing.assert_close(g, torch.full((1, 1, 4, 4), 76 / 127.5 - 1))


def test_folder_listing_options_and_classes(tmp_path: Path, folder: Path):
    flat = ImageFolderDataModule(folder, resolution=8, recursive=False, batch_size=1)
    assert [p.name for p in flat.paths] == ["a.png", "b.JPG"]
    key = ImageFolderDataModule(folder, resolution=8).config_key()
    assert key == ImageFolderDataModule(folder, resolution=8, seed=4, batch_size=3).config_key()
    assert key != flat.config_key()
    save(folder / "e.png", solid(8, 8))  # new data, same config -> new key
    assert key != ImageFolderDataModule(folder, resolution=8).config_key()
    root = tmp_path / "classes"
    save(root / "cat" / "1.png", solid(8, 8))
    save(root / "cat" / "deep" / "2.png", solid(8, 8))
    save(root / "dog" / "3.png", solid(8, 8))
    dm = ImageFolderDataModule(root, resolution=8, class_subfolders=True, batch_size=3)
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    assert sorted(dm.labels) == [0, 0, 1]
    _, y = next(iter(dm.train_dataloader()))
    assert sorted(y.tolist()) == [0, 0, 1]
    save(root / "stray.png", solid(8, 8))
    with pytest.raises(ValueError, match=r"lie directly in .*classes.*stray\.png"):
        ImageFolderDataModule(root, resolution=8, class_subfolders=True, batch_size=1)
    (root / "stray.png").unlink()
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty contains no images"):
        ImageFolderDataModule(root, resolution=8, class_subfolders=True, batch_size=1)


def test_folder_missing_and_empty(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataModule(tmp_path / "nope", resolution=8)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"f\.png"):
        ImageFolderDataModule(tmp_path / "f.png", resolution=8)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no images found in .*empty.*png/jpg/jpeg/webp/bmp"):
        ImageFolderDataModule(empty, resolution=8)


def test_folder_corrupt_files_error_or_skip(tmp_path: Path, caplog):
    root = tmp_path / "mixed"
    for i in range(3):
        save(root / f"ok{i}.png", solid(8, 8))
    good = (root / "ok0.png").read_bytes()
    (root / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "zjunk.jpg").write_bytes(b"definitely not a jpeg")
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8)
    tj = save(tmp_path / "t.jpg", noise).read_bytes()
    (root / "trunc_body.jpg").write_bytes(tj[: 3 * len(tj) // 4])

    dm = ImageFolderDataModule(root, resolution=8, batch_size=1)  # listing succeeds
    with pytest.raises(ValueError, match=r"unreadable image .*trunc\.png"):
        dm.scan()
    with caplog.at_level(logging.WARNING, logger="scm_lightning.data.folder"):
        skip = ImageFolderDataModule(root, resolution=8, batch_size=1, on_bad_file="skip")
        report = skip.scan()
    # header check: the truncated PNG (CRC/stream) and the junk file are caught; a JPEG cut
    # mid-body passes the header check and is found by check="full"
    assert len(report.bad) == 2 and report.num_ok == 4
    assert "skipped 2 unreadable of 6" in caplog.text and "trunc.png" in caplog.text
    assert "zjunk.jpg" in caplog.text
    with pytest.raises(OSError, match=r"cannot decode .*trunc_body\.jpg.*check='full'"):
        skip.reference_images(10)
    full = ImageFolderDataModule(root, resolution=8, batch_size=1, on_bad_file="skip", check="full")
    full_report = full.scan()
    assert len(full_report.bad) == 3 and full_report.num_ok == 3
    assert full.reference_images(10).shape == (3, 3, 8, 8)
    assert full.setup("fit") is None and full.report is full_report  # setup reuses the scan


def test_folder_mixed_sizes_and_square_check(tmp_path: Path):
    root = tmp_path / "sizes"
    save(root / "a.png", solid(8, 8))
    save(root / "b.png", solid(8, 8))
    save(root / "c.png", solid(10, 12))
    dm = ImageFolderDataModule(root, resolution=8, on_mixed_sizes="error", batch_size=1)
    with pytest.raises(ValueError, match=r"mixed sizes \(8x8: 2 \(e\.g\. .*a\.png\), 12x10: 1"):
        dm.scan()
    nocrop = ImageFolderDataModule(root, resolution=8, center_crop=False, batch_size=1)
    with pytest.raises(ValueError, match=r"square images.*12x10 \(e\.g\. .*c\.png\)"):
        nocrop.scan()
    assert ImageFolderDataModule(root, resolution=6, batch_size=3).reference_images(3).shape == (
        3,
        3,
        6,
        6,
    )


# --- tensors --------------------------------------------------------------------------------
def test_tensor_npz_uint8_nhwc_with_labels(tmp_path: Path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 20)
    labels[0] = 6
    np.savez(tmp_path / "d.npz", images=raw, labels=labels)
    dm = TensorDataModule(tmp_path / "d.npz", batch_size=8, val_size=5)
    assert (dm.channels, dm.resolution, dm.num_classes, dm.layout) == (3, 6, 7, "NHWC")
    ref = dm.reference_images(100)
    expected = torch.from_numpy(raw).permute(0, 3, 1, 2).double() / 127.5 - 1
    torch.testing.assert_close(ref.double(), expected, rtol=0, atol=1e-6)
    x, y = next(iter(dm.train_dataloader()))
    check_batch(x, y, 8, 3, 6)
    a, b, c = (
        torch.cat([y for _, y in TensorDataModule(tmp_path / "d.npz", batch_size=4, seed=s)
                   .train_dataloader()])
        for s in (9, 9, 10)
    )  # fmt: skip
    assert torch.equal(a, b) and not torch.equal(a, c)
    unc = TensorDataModule(tmp_path / "d.npz", batch_size=8, conditional=False)
    assert unc.num_classes is None and unc.config_key() != dm.config_key()


def test_tensor_float_formats_ranges_and_latents(tmp_path: Path):
    x = torch.rand(10, 2, 4, 4) * 2 - 1
    save_file({"images": x, "labels": torch.arange(10)}, str(tmp_path / "d.safetensors"))
    dm = TensorDataModule(tmp_path / "d.safetensors", batch_size=5)
    assert (dm.channels, dm.resolution, dm.num_classes) == (2, 4, 10)
    torch.testing.assert_close(dm.reference_images(10), x)
    unit = torch.rand(10, 1, 4, 4)
    torch.save({"x": unit}, tmp_path / "d.pt")
    dm = TensorDataModule(tmp_path / "d.pt", key="x", value_range=(0, 1), batch_size=5)
    torch.testing.assert_close(dm.reference_images(10), unit * 2 - 1)
    assert dm.num_classes is None  # no "labels" array -> unconditional
    latents = torch.randn(12, 4, 8, 8) * 3
    np.save(tmp_path / "lat.npy", latents.numpy())
    dm = TensorDataModule(tmp_path / "lat.npy", value_range=None, batch_size=4)
    assert dm.channels == 4 and torch.equal(dm.reference_images(12), latents)
    with pytest.raises(
        ValueError, match=r"lat\.npy: .* outside the declared value_range \[-1, 1\]"
    ):
        TensorDataModule(tmp_path / "lat.npy", batch_size=4)


def test_tensor_errors_name_the_file_and_value(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        TensorDataModule(tmp_path / "missing.npz")
    np.savez(tmp_path / "k.npz", pixels=np.zeros((4, 1, 4, 4), np.float32))
    with pytest.raises(
        ValueError, match=r"k\.npz: no array named 'images'; available: \['pixels'\]"
    ):
        TensorDataModule(tmp_path / "k.npz", batch_size=1)
    np.savez(tmp_path / "nd.npz", images=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"nd\.npz: .*3 or 4 dimensions.*\(4, 4\)"):
        TensorDataModule(tmp_path / "nd.npz", batch_size=1)
    np.savez(tmp_path / "amb.npz", images=np.zeros((4, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"amb\.npz: cannot tell .*layout="):
        TensorDataModule(tmp_path / "amb.npz", batch_size=1)
    np.savez(tmp_path / "lab.npz", images=np.zeros((4, 1, 4, 4), np.float32), labels=np.zeros(3))
    with pytest.raises(
        ValueError, match=r"lab\.npz: labels 'labels' must have shape \(4,\).*\(3,\)"
    ):
        TensorDataModule(tmp_path / "lab.npz", batch_size=1)
    np.savez(tmp_path / "obj.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"cannot read .*obj\.npz.*allow_pickle"):
        TensorDataModule(tmp_path / "obj.npz", batch_size=1)
    np.savez(tmp_path / "u8.npz", images=np.full((4, 1, 4, 4), 2.0, np.float32))
    with pytest.raises(ValueError, match=r"u8\.npz: 64 values in 4 samples .*max 2"):
        TensorDataModule(tmp_path / "u8.npz", batch_size=1)
    np.savez(tmp_path / "i16.npz", images=np.zeros((4, 1, 4, 4), np.int16))
    with pytest.raises(ValueError, match=r"i16\.npz: dtype torch\.int16 needs an explicit"):
        TensorDataModule(tmp_path / "i16.npz", batch_size=1)
    with pytest.raises(ValueError, match=r"batch_size=9 exceeds the 4 training images"):
        TensorDataModule(tmp_path / "i16.npz", batch_size=9, value_range=(0, 10))


def test_tensor_nonfinite_error_and_skip(tmp_path: Path, caplog):
    x = np.zeros((10, 1, 4, 4), np.float32)
    x[3, 0, 1, 1] = np.nan
    x[7, 0, 0, 0] = np.inf
    x[7, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", images=x, labels=np.arange(10))
    with pytest.raises(ValueError, match=r"nan\.npz: 3 non-finite values in 2 samples .*\[3, 7\]"):
        TensorDataModule(tmp_path / "nan.npz", batch_size=2)
    with caplog.at_level(logging.WARNING, logger="scm_lightning.data.tensors"):
        dm = TensorDataModule(tmp_path / "nan.npz", batch_size=2, on_nonfinite="skip")
    assert "skipping 2 samples" in caplog.text and "[3, 7]" in caplog.text
    assert dm.num_dropped == 2 and dm.num_images == 8
    kept = torch.cat([y for _, y in dm.val_dataloader()])
    assert sorted(kept.tolist()) == [0, 1, 2, 4, 5, 6, 8, 9]


def test_folder_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 257 * 100], [65535, 30000]], dtype=np.uint16)
    save(tmp_path / "g" / "x.png", values)
    with Image.open(tmp_path / "g" / "x.png") as im:
        assert im.mode.startswith("I")  # PIL reads 16-bit PNGs as I;16 / I
    dm = ImageFolderDataModule(tmp_path / "g", resolution=2, channels=1, batch_size=1)
    expected = np.round(values / 257.0) / 127.5 - 1  # 16-bit -> 8-bit -> [-1, 1]
    torch.testing.assert_close(
        dm.reference_images(1)[0, 0], torch.tensor(expected, dtype=torch.float32)
    )


def test_digits_runs_under_a_lightning_trainer(tmp_path: Path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple] = []

        def training_step(self, batch, _):
            x, y = batch
            self.seen.append((tuple(x.shape), x.dtype, y.dtype))
            return (self.w * x.mean()).sum() + self.w.square().sum()

        def validation_step(self, batch, _):
            self.seen.append(("val", tuple(batch[0].shape)))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(
        max_steps=3, limit_val_batches=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
        val_check_interval=3, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(probe, datamodule=DigitsDataModule(batch_size=16, val_size=8))
    train = [s for s in probe.seen if s[0] != "val"]
    assert train == [((16, 1, 8, 8), torch.float32, torch.int64)] * 3
    assert ("val", (8, 1, 8, 8)) in probe.seen
