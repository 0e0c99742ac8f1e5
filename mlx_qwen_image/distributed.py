"""Several Macs as one: runs split over an ``mx.distributed`` group (``mlx.launch``: the ring backend over TCP or
Thunderbolt, MPI, JACCL).

- ``cfg``: rank 0 runs the conditional branch of every step, rank 1 the unconditional one; one all-gather of the
  velocity per step. The image equals the single-Mac one.
- ``tensor``: each block's attention heads and MLP hidden units are split over the ranks (q/k/v and the MLP's first
  layer column-sharded, the output projections row-sharded with one all-reduce per sublayer); every rank holds
  only its shard of the block weights, sharded lazily and evaluated one layer at a time. The timestep path is
  computed by every rank before the loop and freed for it (so it is never resident whole). Rank 0 alone holds
  the text encoder and sends the features (and a prompt rewrite) to the others; the VAE is on every rank.
- ``data``: the images of a run with several seeds are spread over the ranks (the CLI's ``--num-images``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

MODES = ("cfg", "tensor", "data")
CONNECT_TIMEOUT = 60.0  # seconds a rank waits for the others before it says so and stops


class DistributedError(RuntimeError):
    """The ranks could not work together (one unreachable, a mode that does not fit the group)."""


def launched() -> bool:
    """Whether this process was started as one rank of a group (by ``mlx.launch`` or ``mpirun``)."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def rank() -> int:
    """This process's rank as its launcher set it (0 when it runs alone): known before the group is joined."""
    return int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def connect(timeout: float = CONNECT_TIMEOUT):
    """The group of this process's ranks, or None when it runs alone.

    A rank that cannot reach the others within ``timeout`` seconds is stopped with a one-line message on stderr
    instead of waiting forever: joining blocks inside MLX, where no Python thread or signal handler gets to run,
    so a small watchdog process does it."""
    if not launched():
        return None
    message = (f"Error: rank {rank()} could not reach the other ranks within {timeout:.0f} s: check the host list "
               "(mlx.launch --hosts / --hostfile) and that every host can reach the others")
    watchdog, wake = _watchdog(timeout, message)
    try:
        group = mx.distributed.init(strict=True)
    except Exception as e:
        raise DistributedError(f"rank {rank()} could not join the group: {e}; check the host list (mlx.launch "
                               "--hosts / --hostfile) and that every host can reach the others") from None
    finally:
        os.close(wake)  # the watchdog sees the pipe close and leaves quietly
        watchdog.wait()
    return group if group.size() > 1 else None


def _watchdog(timeout: float, message: str):
    """A process that prints ``message`` and kills this one unless the returned pipe closes within ``timeout``."""
    read, write = os.pipe()
    code = ("import os, select, signal, sys\n"
            "if not select.select([int(sys.argv[1])], [], [], float(sys.argv[2]))[0]:\n"
            "    sys.stderr.write(sys.argv[3] + '\\n'); sys.stderr.flush()\n"
            "    os.kill(int(sys.argv[4]), signal.SIGKILL)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(read), str(timeout), message, str(os.getpid())],
                            pass_fds=(read,), stdin=subprocess.DEVNULL)
    os.close(read)
    return proc, write


def agree(group, value: int) -> int:
    """Rank 0's ``value`` on every rank (a random seed, a time stamp): one all-sum in which the others send 0."""
    from . import runtime

    mine = value if group.rank() == 0 else 0
    return runtime.call(lambda: int(mx.distributed.all_sum(mx.array(mine, dtype=mx.int64), group=group).item()))


def broadcast_json(group, value):
    """Rank 0's ``value`` (anything JSON can hold) on every rank: its length, then its bytes, each in an all-sum
    to which the other ranks add zeros. Called on the MLX thread."""
    import json

    import numpy as np

    data = json.dumps(value).encode() if group.rank() == 0 else b""
    n = int(mx.distributed.all_sum(mx.array(len(data), dtype=mx.int64), group=group).item())
    mine = np.frombuffer(data, dtype=np.uint8) if group.rank() == 0 else np.zeros(n, dtype=np.uint8)
    got = np.array(mx.distributed.all_sum(mx.array(mine), group=group)).astype(np.uint8)
    return json.loads(got.tobytes())


def everyone(group, yes: bool) -> bool:
    """Whether ``yes`` holds on every rank (a Mac with less memory than the others decides for all)."""
    from . import runtime

    count = runtime.call(lambda: int(mx.distributed.all_sum(mx.array(int(yes), dtype=mx.int64), group=group).item()))
    return count == group.size()


def barrier(group) -> int:
    """Wait for every rank; returns how many there are (an all-sum of ones)."""
    from . import runtime

    return runtime.call(lambda: int(mx.distributed.all_sum(mx.array(1, dtype=mx.int64), group=group).item()))


def choose(mode: str | None, group, cfg: bool, images: int, fits_one: bool, tensor: bool = True,
           name: str = "this model") -> str:
    """The mode to run: the asked one, checked against the group, or the fastest that fits. ``tensor``: whether
    the model's blocks can be sharded (``name`` says which model when they cannot)."""
    size = group.size()
    if mode is None:
        if fits_one and images >= size:
            return "data"
        if fits_one and cfg and size == 2:
            return "cfg"
        if tensor:
            return "tensor"
        if not fits_one:
            raise DistributedError(f"{name} may not fit in one rank's memory and cannot be split by block (no "
                                   f"--parallel tensor for it); try --quantize 8 or 4, or pass --parallel cfg or data")
        raise DistributedError(f"{name} splits over ranks only by image (--num-images {size} or more) or by CFG "
                               f"branch (2 ranks and --cfg-scale above 1): --parallel tensor is not available for it")
    if mode not in MODES:
        raise DistributedError(f"--parallel {mode}: use one of {', '.join(MODES)}")
    if mode == "tensor" and not tensor:
        raise DistributedError(f"--parallel tensor is not available for {name}; use --parallel cfg (2 ranks, "
                               f"--cfg-scale above 1) or --parallel data (several images)")
    if mode == "cfg" and (size != 2 or not cfg):
        raise DistributedError(f"--parallel cfg needs exactly 2 ranks and CFG on (cfg_scale > 1); this run has "
                               f"{size} rank(s){'' if cfg else ' and CFG off'}")
    return mode


def check_tensor(config, size: int):
    """Refuse a transformer whose heads or MLP do not split evenly over ``size`` ranks."""
    heads, hidden = config.num_attention_heads, 4 * config.inner_dim
    if heads % size or hidden % size:
        raise DistributedError(f"--parallel tensor: {heads} attention heads and {hidden} MLP units do not split "
                               f"evenly over {size} ranks")


def shard_transformer(model, group) -> int:
    """Shard every block of ``model`` over ``group`` in place (Megatron-style); returns the parameters it keeps.

    Weights are sliced lazily and evaluated one layer at a time, so no rank ever holds a whole block's weights."""
    size = group.size()
    check_tensor(model.config, size)
    odd = sorted({type(m).__name__ for _, m in model.transformer_blocks[0].named_modules()
                  if hasattr(m, "base") or type(m).__name__ == "DroppedLinear"})
    if odd:
        raise DistributedError(f"--parallel tensor cannot shard {', '.join(odd)} layers (a LoRA beside quantized "
                               "weights): bake the LoRA into the checkpoint with convert --lora, or use cfg/data")
    for block in model.transformer_blocks:
        attn = block.attn
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            _replace(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
        attn.to_out[0] = _evaluated(shard_linear(attn.to_out[0], "sharded-to-all", group=group))
        _replace(attn, "to_add_out", shard_linear(attn.to_add_out, "sharded-to-all", group=group))
        attn.heads //= size
        for mlp in (block.img_mlp, block.txt_mlp):
            mlp.net[0].proj = _evaluated(shard_linear(mlp.net[0].proj, "all-to-sharded", group=group))
            mlp.net[2] = _evaluated(shard_linear(mlp.net[2], "sharded-to-all", group=group))
        mx.clear_cache()
    return sum(v.size for _, v in _leaves(model))


def _replace(parent, name: str, layer):
    setattr(parent, name, _evaluated(layer))


def _evaluated(layer: nn.Module) -> nn.Module:
    mx.eval(layer.parameters())
    return layer


def _leaves(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())
