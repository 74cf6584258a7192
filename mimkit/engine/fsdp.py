"""FSDP2 (``--strategy fsdp``): PyTorch's ``fully_shard`` on every transformer block and on the whole model.

Parameters, gradients and optimizer state are sharded across ranks (each rank holds 1/world of them); every block
gathers its weights for its forward and backward and frees them after. Checkpoints are sharded folders by default
(``mimkit/engine/sharded.py``: each rank writes its own shards); with ``--checkpoint-format file`` the functions here
gather the full model and optimizer state (``torch.distributed.checkpoint``'s state-dict functions) for rank 0 to
write the single verified file of ``mimkit/engine/checkpoint.py`` in exactly the format a DDP or single-process run
writes. Either way a run resumes on any number of ranks and with either strategy (docs/clusters.md).

Building: only rank 0 builds the full model, on the CPU; every rank builds a twin on the meta device (shapes, no
memory), shards it and allocates only its own shard on its device (``to_empty``), which :func:`materialise_shards`
fills from rank 0's copy (``broadcast_from_rank0``). No GPU ever holds the whole model, and ranks other than 0 never
hold it in host memory either.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

BLOCK_LISTS = ("blocks",)  # timm's convention: a model's transformer blocks are a ModuleList/Sequential "blocks"


def shard_model(model: nn.Module, bf16: bool = False) -> int:
    """``fully_shard`` each block (any element of a ModuleList named ``blocks``, in the encoder, its stages and the
    decoder), then the model itself for the rest; with ``bf16`` the blocks compute in bf16 and reduce gradients in
    fp32 (MixedPrecisionPolicy). Returns the number of blocks sharded."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The methods return (loss, outputs) whose tensors may be views; the trainer never changes them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mp_policy": policy} if policy is not None else {}
    blocks = [
        block
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in BLOCK_LISTS and isinstance(module, (nn.ModuleList, nn.Sequential))
        for block in module
    ]
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return len(blocks)


def materialise_shards(model: nn.Module, full: nn.Module | None, device: torch.device) -> None:
    """Give a sharded meta-device ``model`` real storage on ``device`` (each rank its own shard) and the values of
    ``full``, the same model built normally, which only rank 0 passes (others pass None): parameters and persistent
    buffers through ``set_model_state_dict(broadcast_from_rank0=True)``, non-persistent buffers (position tables,
    index maps) broadcast one by one. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    persistent = set(model.state_dict())
    source = dict(full.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in persistent:
                continue
            value = source[name].to(device) if full is not None else torch.empty_like(buf)
            dist.broadcast(value, src=0)
            buf.copy_(value)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"FSDP materialisation left tensors on the meta device: {', '.join(left[:5])}")


def _param_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: the integer ids of ``optimizer.state_dict()``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of a sharded model, gathered in full on CPU in the plain format
    (``model.state_dict()``, ``optimizer.state_dict()`` with integer ids). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    by_name: Any = get_optimizer_state_dict(model, optimizer, options=options)
    if "state" not in by_name:  # ranks other than 0 receive nothing with cpu_offload
        return model_state, {}
    order = _param_order(model, optimizer)
    index = {name: i for i, name in enumerate(order)}
    optim_state = {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }
    return model_state, optim_state


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load a full (plain-format) checkpoint state into a sharded model and its optimizer; every rank holds the
    state and keeps its own shard. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=options)
    order = _param_order(model, optimizer)
    by_name: Any = {
        "state": {order[int(i)]: value for i, value in optim_state["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def parameter_norm(params) -> torch.Tensor:
    """The L2 norm of all (sharded) parameters: local shards' sums of squares, one all-reduce."""
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float64)
    device = None
    for p in params:
        local = cast(Any, p).detach().to_local() if isinstance(p, DTensor) else p.detach()
        device = local.device
        total = total.to(device) + local.double().pow(2).sum()
    if device is not None and dist.is_initialized():
        dist.all_reduce(total)
    return total.sqrt().float()


def full_norm(value) -> torch.Tensor:
    """A DTensor result (e.g. ``clip_grad_norm_``'s total norm) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
