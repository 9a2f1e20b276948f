"""Train the small AutoencoderKL behind the latent digits experiment (experiment=digits_latent_*).

Usage (CPU, one thread, ~10 minutes)::

    python scripts/train_digits_vae.py --out src/scm_lightning/assets/digits_vae

sklearn's 1797 digits, bilinearly upsampled to 32×32 in ``[-1, 1]`` (exactly what
``DigitsDataModule(resolution=32, upsample="bilinear")`` yields), are encoded to 4×8×8
latents by a diffusers ``AutoencoderKL`` (three blocks of 16/32/32 channels, one ResNet per
block, GroupNorm with 8 groups). Loss: per-pixel MSE of the decoded posterior sample plus
``--kl-weight`` × the KL to N(0, I) (mean over latent elements; a small weight keeps the
latents near unit scale without blurring the reconstructions). Adam with a cosine decay.
The folder is written with ``save_pretrained`` (``config.json`` + safetensors) and loads with
``AutoencoderKL.from_pretrained``. Printed: reconstruction MSE of the posterior means on all
1797 digits and the bundled digits classifier's accuracy on the reconstructions.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from scm_lightning.data.digits import load_digits_tensors

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/scm_lightning/assets/digits_vae"
RESOLUTION = 32


def build_vae(latent_channels: int = 4) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


@torch.no_grad()
def reconstruction_report(
    vae: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    from scm_lightning.metrics.features import load_digits_classifier

    vae.eval()
    recon = torch.cat(
        [vae.decode(vae.encode(x).latent_dist.mean).sample for x in images.split(256)]
    )
    classifier = load_digits_classifier()
    predicted = classifier.logits(recon.clamp(-1, 1)).argmax(dim=1)
    reference = classifier.logits(images).argmax(dim=1)
    return {
        "recon_mse": float(((recon - images) ** 2).mean()),
        "recon_class_accuracy": float((predicted == labels).float().mean()),
        "data_class_accuracy": float((reference == labels).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--latent-channels", type=int, default=4)
    args = parser.parse_args()

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_tensors(RESOLUTION, "bilinear")
    vae = build_vae(args.latent_channels)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    vae.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=gen)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = ((recon - x) ** 2).mean()
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            print(
                f"step {step:5d}  mse {mse.item():.5f}  kl {kl.item():.3f}  "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    report = reconstruction_report(vae, images, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(str(args.out))
    recipe = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "training.json").write_text(
        json.dumps({"recipe": recipe, **report}, indent=2) + "\n"
    )
    size = sum(p.stat().st_size for p in args.out.iterdir()) / 1024
    print(json.dumps(report), flush=True)
    print(f"saved {args.out} ({size:.0f} KiB) in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
