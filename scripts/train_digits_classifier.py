"""Train the digits classifier whose features score FID on the digits data.

Usage (CPU, ~20 s)::

    python scripts/train_digits_classifier.py \
        --out src/scm_lightning/assets/digits_classifier.safetensors

sklearn's 1797 digits (pixels 0..16 mapped to ``[-1, 1]`` by ``p/8 − 1``, as in
``scm_lightning.data.digits``) are split 80/20 (stratified, seeded); the net trains on the
80% with random ±1 px shifts and small Gaussian pixel noise, and the held-out 20% test
accuracy is printed and stored in the file's metadata.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scm_lightning.metrics.features import DigitsClassifier

DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "src/scm_lightning/assets/digits_classifier.safetensors"
)


def load_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as ``(x_train, y_train, x_test, y_test)``; images ``(N, 1, 8, 8)`` in ``[-1, 1]``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=seed, stratify=bunch.target
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to one pixel (replicate-free: pad with background −1) plus noise."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=generator)
    dy = torch.randint(0, 3, (n,), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(n)])
    return (out + 0.05 * torch.randn(out.shape, generator=generator)).clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(net: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return (net.logits(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_split(args.seed)
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(y_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(len(y_train) // args.batch_size):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(net.logits(augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(
                f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  "
                f"test acc {accuracy(net, x_test, y_test):.4f}"
            )

    from safetensors.torch import save_file

    train_acc = accuracy(net, x_train, y_train)
    test_acc = accuracy(net, x_test, y_test)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "seed": str(args.seed),
        "epochs": str(args.epochs),
        "train_accuracy": f"{train_acc:.4f}",
        "test_accuracy": f"{test_acc:.4f}",
        "num_params": str(sum(v.numel() for v in state.values())),
    }
    save_file(state, str(args.out), metadata=metadata)
    print(f"train acc {train_acc:.4f}  test acc {test_acc:.4f}  ({len(y_test)} held-out images)")
    print(
        f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) "
        f"in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
