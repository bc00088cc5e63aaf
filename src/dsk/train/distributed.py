"""Training on several GPUs (or CPU processes) with torch.distributed, for the trainer's loop.

What the loop needs from here: the torchrun environment (rank, world size, local rank), the
model wrapped in DistributedDataParallel (the default) or FSDP2 (``fully_shard``), DDP's
gradient-compression hooks (bf16, PowerSGD), no gradient sync on all but the last
micro-batch, the routers' expert loads summed across ranks (so every rank nudges the same
biases), rank 0's host-side decisions (time budget, timed checkpoints) shared by all, and
checkpoints that resume on any number of ranks (DDP: rank 0 writes the usual full checkpoint;
FSDP: every rank writes its shards with torch.distributed.checkpoint, which reshards on load).

    $ dsk pretrain --nproc 2                                      # relaunches itself under torchrun
    $ torchrun --standalone --nproc-per-node 2 -m dsk pretrain    # the same, started by hand
    $ dsk pretrain --nproc 2 --strategy fsdp --resume             # resume a run on 2 ranks

Each rank reads a disjoint slice of every global batch (``TokenData.shard``), so N ranks with a
global batch of B sequences compute the same gradient as one process with B sequences.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from dsk.errors import DskError

STRATEGIES = ("ddp", "fsdp")
COMM_HOOKS = ("none", "bf16", "fp16", "powersgd")
# NVLink multicast (NVLS) can take a shared host's GPUs out of service; keep it off everywhere
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world size from the variables torchrun sets (one process when they are absent)."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def under_torchrun() -> bool:
    return env_info().enabled


def init(device: str) -> DistInfo:
    """Join the process group (NCCL on CUDA, gloo on CPU) if torchrun started several processes."""
    info = env_info()
    if not info.enabled:
        return info
    for key, value in SAFE_NCCL_ENV.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank))
        else:
            dist.init_process_group("gloo")
    return info


def rank_device(info: DistInfo, device: str) -> str:
    """Each rank's own GPU: cuda:<local rank>."""
    return f"cuda:{info.local_rank}" if device == "cuda" and info.enabled else device


def wrap(model: nn.Module, info: DistInfo, *, strategy: str, comm_hook: str = "none",
         powersgd_rank: int = 1, powersgd_start: int = 10) -> nn.Module:
    """DDP (with an optional compression hook) or FSDP2 over ``model``, which is already on its device."""
    if strategy not in STRATEGIES:
        raise DskError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if comm_hook not in COMM_HOOKS:
        raise DskError(f"unknown comm hook {comm_hook!r}; use one of {', '.join(COMM_HOOKS)}")
    if strategy == "fsdp":
        if comm_hook != "none":
            raise DskError("--comm-hook is a DDP option; drop it or use --strategy ddp")
        from torch.distributed.fsdp import fully_shard

        # one all-gather per block (overlapping the previous block's compute), then the rest
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    cuda = next(model.parameters()).is_cuda
    # buffers are not broadcast: the rope tables are constants, router biases stay equal because
    # every rank applies the same summed load, and each rank's load counter must stay its own
    # (newer torch renames the switch; syncing the equal buffers once at start is harmless)
    import inspect

    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    ddp = DDP(model, device_ids=[info.local_rank] if cuda else None, gradient_as_bucket_view=True, **no_buffer_sync)
    if comm_hook == "bf16":
        if not cuda:
            raise DskError("--comm-hook bf16 needs NCCL (CUDA GPUs); on CPU use fp16 or powersgd")
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif comm_hook == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif comm_hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=powersgd_start, use_error_feedback=True,
                                            warm_start=True)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return ddp


def grad_sync(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce on micro-batches before the last one of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        return paused()
    return contextlib.nullcontext()


def mean(value: torch.Tensor) -> torch.Tensor:
    """All-reduce average of a scalar (the logged loss)."""
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def sum_expert_load(moe_layers: dict) -> None:
    """Sum every MoE layer's token counts over the ranks, in one all-reduce, in place."""
    if not moe_layers:
        return
    loads = [m.load for m in moe_layers.values()]
    flat = torch.cat(loads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for load, summed in zip(loads, flat.split([t.numel() for t in loads])):
        load.copy_(summed)


def agree(*flags: bool, device: str) -> tuple[bool, ...]:
    """Rank 0's host-side decisions (wall clock) for everyone, so no rank leaves the loop alone."""
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.broadcast(t, src=0)
    return tuple(bool(x) for x in t.tolist())


# --------------------------------------------------------------------------- FSDP checkpoints


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / "dcp").is_dir()


def save_sharded(directory: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 trainer_state: dict[str, Any], meta: dict[str, Any], keep: int, info: DistInfo) -> Path:
    """Every rank writes its shards (torch.distributed.checkpoint); rank 0 adds trainer.pt and meta.json.

    Written under a temporary name and renamed by rank 0 once every rank has finished.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dsk.models import config_json
    from dsk.train.checkpoint import PREFIX, list_checkpoints

    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f".tmp-{PREFIX}{step:08d}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    if info.is_main:
        torch.save({k: v for k, v in trainer_state.items() if k != "optimizer"}, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "format": "dcp", "world": info.world,
                                                   "model_config": config_json(model.cfg)},
                                                  indent=2, sort_keys=True, default=str))
    dist.barrier()
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 expect_fingerprint: str) -> dict[str, Any]:
    """Load a sharded checkpoint into this (possibly differently sized) group; DCP reshards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = json.loads((path / "meta.json").read_text())
    if meta.get("fingerprint") != expect_fingerprint:
        raise DskError(f"checkpoint {str(path)!r} is from another config; start fresh without --resume")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)


def full_model(model: nn.Module, info: DistInfo) -> nn.Module | None:
    """A plain CPU copy of an FSDP-sharded model on rank 0 (None elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dsk.models import Transformer

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    plain = Transformer(model.cfg)
    plain.load_state_dict(sd)
    return plain


def shutdown() -> None:
    """Leave the process group while the interpreter is alive. A gloo group left to the interpreter's
    teardown aborts the process now and then ("terminate called without an active exception": its
    worker threads outlive it), and a DDP wrapper in a reference cycle keeps the group alive past
    ``destroy_process_group`` unless it is collected first."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
