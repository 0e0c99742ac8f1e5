"""One rank of the multi-Mac tests, started by `mlx.launch --backend ring -n 2` from tests/test_distributed.py.

    pipeline MODE FOLDER OUT   load the tiny checkpoint split as MODE says (cfg or tensor), make one image from
                               fixed noise (generate), its latents (denoise) and a prompt rewrite; rank 0 saves
                               them, every rank's block bytes and whether it holds the text encoder
    model BITS OUT             a random transformer (quantized to BITS unless 0), its output on fixed inputs
                               before and after `shard_transformer`, the block bytes of each rank then and the
                               sizes of the all-reduces the sharded pass asks for
"""

import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_qwen_image import QwenImagePipeline, runtime
from mlx_qwen_image.distributed import connect, shard_transformer

WIDE = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=64, axes_dims_rope=[8, 28, 28])


def block_bytes(model) -> int:
    """What a rank holds for the loop: the block weights but the timestep path's (freed for the loop)."""
    return sum(v.nbytes for k, v in tree_flatten(model.parameters())
               if k.startswith("transformer_blocks") and "_mod." not in k)


def gather(group, value: int) -> np.ndarray:
    return np.array(mx.distributed.all_gather(mx.array([value], dtype=mx.int64), group=group))


def pipeline(group, mode, folder):
    pipe = QwenImagePipeline.from_pretrained(folder, dtype="float32", group=group, parallel=mode)
    latents = np.random.default_rng(0).standard_normal((1, 12, 16)).astype(np.float32)
    settings = dict(width=64, height=48, steps=3, cfg_scale=4.0, latents=latents)
    image = pipe.generate("a lamp on a desk", output="np", **settings)  # the API a server would call
    run = pipe.denoise("a lamp on a desk", **settings)
    run.complete("np")
    enhanced, _ = pipe.enhance_prompt("a lamp on a desk", max_tokens=6)
    sizes = runtime.call(gather, group, block_bytes(pipe.transformer))
    encoders = runtime.call(gather, group, int(pipe.prompts.text_encoder is not None))
    return dict(image=image, latents=np.array(run.latents), resident=sizes, encoders=encoders,
                enhanced=np.array(enhanced))


def model(group, bits):
    from mlx_qwen_image.loading import quantize_model
    from mlx_qwen_image.models.transformer import QwenImageTransformer

    rng = np.random.default_rng(0)  # the same weights and inputs on every rank
    net = QwenImageTransformer.from_config(WIDE)
    net.update(tree_map(lambda p: mx.array(rng.standard_normal(p.shape).astype(np.float32) * 0.05),
                        net.parameters()))
    if bits:
        quantize_model(net, bits=bits)
    shapes = [[(1, 4, 6)]]
    x = mx.array(rng.standard_normal((1, 24, 16)).astype(np.float32))
    txt = mx.array(rng.standard_normal((1, 7, 64)).astype(np.float32))
    sigma = mx.array([0.6], dtype=mx.float32)
    whole, whole_bytes = np.array(net(x, txt, None, sigma, shapes)), block_bytes(net)
    shard_transformer(net, group)
    reduced, all_sum = [], mx.distributed.all_sum

    def counting(a, *args, **kwargs):  # the sharded layers' all-reduces, as the graph is built
        reduced.append(a.nbytes)
        return all_sum(a, *args, **kwargs)

    mx.distributed.all_sum = counting
    try:
        split = np.array(net(x, txt, None, sigma, shapes))
    finally:
        mx.distributed.all_sum = all_sum
    return dict(whole=whole, split=split, whole_bytes=whole_bytes, resident=gather(group, block_bytes(net)),
                reduced=np.array(reduced))


if __name__ == "__main__":
    group = connect(timeout=30)
    if sys.argv[1] == "pipeline":
        result = pipeline(group, sys.argv[2], sys.argv[3])
    else:
        result = runtime.call(model, group, int(sys.argv[2]))
    if group.rank() == 0:
        np.savez(sys.argv[-1], **result)
