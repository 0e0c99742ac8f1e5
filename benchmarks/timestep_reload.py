"""What freeing the timestep-path weights for every run's loop costs: the time to read them back for the next run.

A full-width transformer with ``--blocks`` blocks (random weights, the 4-bit recipe: those layers at 8 bits) is
written as an MLX checkpoint and loaded as the pipeline loads it; its timestep path is freed as during a run's loop,
restored lazily from the file, and evaluated with the page cache dropped first, so the bytes come from the disk.
The rate extrapolates to the 60-block model's 7.28 GB.

    python benchmarks/timestep_reload.py --blocks 2 --folder /tmp/reload
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_qwen_image.config import TransformerConfig
from mlx_qwen_image.loading import lazy_weights, load_model
from mlx_qwen_image.models.transformer import QwenImageTransformer
from mlx_qwen_image.quantize import quantize_transformer

FULL_SIZE_BYTES = 7.28e9  # the timestep path of the 60-block model under the 4-bit recipe (8-bit layers)


def _drop_page_cache(folder: Path):
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--folder", default="/tmp/mlx-qwen-image-reload")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = {**TransformerConfig().__dict__, "num_layers": args.blocks, "axes_dims_rope": [16, 56, 56]}
    model = QwenImageTransformer.from_config(config)
    model.set_dtype(mx.bfloat16)
    plan = quantize_transformer(model, 4)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    import json

    from mlx_qwen_image.quantize import quantization_block

    (folder / "config.json").write_text(json.dumps({**config, "quantization": quantization_block(plan)}))
    del model, weights

    model = load_model(QwenImageTransformer, folder, mx.bfloat16)
    mx.eval(model.parameters())
    model.mark_timestep_path()
    paths = tuple(p + "." for p in model.modulation_layer_paths())
    nbytes = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith(paths))
    t = np.linspace(1.0, 0.02, 50).astype(np.float32)
    model.modulation_table(t, drop_weights=True)  # freed, as during a run's loop
    model.restore_modulation_weights(lazy_weights(folder))  # lazy: nothing read yet
    _drop_page_cache(folder)
    start = time.perf_counter()
    mx.eval([v for k, v in tree_flatten(model.parameters()) if k.startswith(paths)])
    cost = time.perf_counter() - start
    rate = nbytes / cost
    print(f"{args.blocks} blocks: timestep path {nbytes / 1e9:.2f} GB read back from disk in {cost:.2f} s "
          f"({rate / 1e9:.2f} GB/s)")
    print(f"60 blocks ({FULL_SIZE_BYTES / 1e9:.2f} GB): {FULL_SIZE_BYTES / rate:.1f} s per run on this machine; "
          f"{FULL_SIZE_BYTES / 6e9:.1f}-{FULL_SIZE_BYTES / 3e9:.1f} s on a Mac SSD reading 3-6 GB/s")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
