"""Forward-mode (JVP) building blocks: flash-style attention with a JVP rule (spec §6)."""

from __future__ import annotations

from typing import Any

from scm_lightning.jvp.attention import DEFAULT_BLOCK_SIZE, attention_with_tangent, jvp_attention

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "JVPAttnProcessor",
    "attention_with_tangent",
    "install_jvp_attention",
    "jvp_attention",
]


def __getattr__(name: str) -> Any:
    # install.py imports diffusers (slow); load it only when asked for.
    if name in ("JVPAttnProcessor", "install_jvp_attention"):
        from scm_lightning.jvp import install

        return getattr(install, name)
    raise AttributeError(f"module 'scm_lightning.jvp' has no attribute {name!r}")
