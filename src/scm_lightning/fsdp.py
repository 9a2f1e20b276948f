"""FSDP2 (``torch.distributed.fsdp.fully_shard``) helpers for the student (and teacher).

No Lightning here: :meth:`scm_lightning.modules._TrigFlowModule.configure_model` calls
:func:`shard_model` with the data-parallel mesh of Lightning's ``ModelParallelStrategy``.

Why each piece:

* Blocks are their own FSDP units so only one block's full weights live at a time; the root
  unit holds the rest (embeddings, ``conv_in``/``conv_out``).
* Any submodule called *outside* the root's ``forward`` must be a unit of its own, else its
  parameters are still sharded when it runs: the student's ``logvar`` head (w_φ(t)) is called
  directly by the loss, hence ``extra_units``.
* ``torch.func.jvp`` works through the sharded student (the all-gathers are ordinary ops on the
  primal; the tangents pass through them), so the sCM tangent is exact. By default it runs
  with grad enabled and its primal is reused as F_θ for the loss (one pass,
  ``losses.scm_loss``); only a separate JVP precision (``loss.jvp_precision``) makes it a
  second, ``no_grad`` pass. Both work under FSDP2 (``tests/test_distributed.py`` runs the
  default and matches DDP and a single process). What fails through FSDP2 is the other
  forward-AD API, ``torch.autograd.forward_ad`` dual tensors with grad enabled (field notes);
  the project does not use it.
* Forgetting the sharding is silent under ModelParallelStrategy: nothing averages the
  gradients, so ranks drift apart (``tests/test_distributed.py`` demonstrates it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` holds DTensor parameters (it, or a part of it, is fully_shard-ed)."""
    return any(hasattr(p, "device_mesh") for p in module.parameters())


def block_units(module: nn.Module, min_params: int = 1) -> list[nn.Module]:
    """The blocks to shard: elements of every ``nn.ModuleList`` with ``>= min_params`` parameters.

    Outermost first and never nested (a block inside a chosen block stays part of it). This
    picks TrigFlowUNet's ``down``/``mid``/``up`` blocks and diffusers' ``down_blocks``,
    ``mid_block`` attentions/resnets and ``up_blocks`` alike.
    """
    chosen: list[nn.Module] = []
    inside: set[int] = set()

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if id(child) in inside:
                continue
            if (
                isinstance(m, nn.ModuleList)
                and sum(p.numel() for p in child.parameters()) >= min_params
            ):
                chosen.append(child)
                inside.update(id(c) for c in child.modules())
                continue
            visit(child)

    visit(module)
    return chosen


def shard_model(
    module: nn.Module,
    mesh: Any,
    extra_units: Iterable[nn.Module] = (),
    min_params: int = 1,
    reshard_after_forward: bool = True,
) -> list[nn.Module]:
    """``fully_shard`` each block, each of ``extra_units``, then ``module`` itself (the root).

    Idempotent (an already sharded module is left alone). Returns the units sharded, root last.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(module):
        return []
    extra = [u for u in extra_units if u is not None]
    units = [u for u in block_units(module, min_params) if all(u is not e for e in extra)]
    units += extra
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return [*units, module]


def full_state_dict(module: nn.Module, cpu_offload: bool = True) -> dict[str, Tensor]:
    """The unsharded ``state_dict`` of a (possibly) sharded module; a collective when sharded.

    Every rank must call it when ``module`` is sharded. With ``cpu_offload`` (default) only
    rank 0 receives the tensors (other ranks get ``{}``); without it every rank gets them.
    A plain module simply returns its ``state_dict()`` (detached clones).
    """
    if not is_sharded(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    return get_model_state_dict(module, options=options)


def full_norm(x: Tensor) -> Tensor:
    """The global value of a (possibly Partial/Shard) DTensor reduction; identity otherwise."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
