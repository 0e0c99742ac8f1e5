"""Peak memory of the streaming converter on a synthetic checkpoint of a few GB.

Writes a source checkpoint whose transformer has the released width (3072, 24 heads) but only ``--blocks``
blocks (bf16, in ~1 GB shards as diffusers writes them, released names), with a tiny text encoder and VAE, then
converts it in a fresh process per setting and reports ``mx.get_peak_memory()`` and the process's peak RSS
against the sizes of the largest input and output shards. Deletes everything it wrote.

Run: ``python benchmarks/convert_memory.py --folder /tmp/convert-memory --blocks 5`` (about 3.5 GB on disk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_qwen_image.models.text_encoder import QwenTextEncoder  # noqa: E402
from mlx_qwen_image.models.transformer import QwenImageTransformer  # noqa: E402
from mlx_qwen_image.models.vae import QwenImageVAE  # noqa: E402

RELEASED = ROOT / "tests" / "fixtures" / "qwen_image"
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def write_source(folder: Path, blocks: int, shard_bytes: int = 10**9):
    folder.mkdir(parents=True)
    for name in ("model_index.json", "scheduler", "tokenizer"):
        src = RELEASED / name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, folder / name)
    config = {**json.loads((RELEASED / "transformer" / "config.json").read_text()), "num_layers": blocks}
    model = QwenImageTransformer.from_config(config)
    _write(folder / "transformer", "diffusion_pytorch_model", config, tree_flatten(model.parameters()), shard_bytes)
    for name, cls, cfg, stem in (("text_encoder", QwenTextEncoder, TINY_TEXT, "model"),
                                 ("vae", QwenImageVAE, TINY_VAE, "diffusion_pytorch_model")):
        model = cls.from_config(cfg)
        _write(folder / name, stem, cfg, tree_flatten(model.parameters()), shard_bytes)


def _write(folder: Path, stem: str, config: dict, params, shard_bytes: int):
    """Random bf16 weights in shards of about ``shard_bytes``, each written as soon as it is full."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    files, weight_map, current, size = [], {}, {}, 0

    def flush():
        files.append(f"part-{len(files)}.safetensors")
        mx.save_safetensors(str(folder / files[-1]), current)
        weight_map.update({k: files[-1] for k in current})
        current.clear()

    for name, p in params:
        current[name] = (0.02 * mx.random.normal(p.shape)).astype(mx.bfloat16)
        mx.eval(current[name])
        size += current[name].nbytes
        if size >= shard_bytes:
            flush()
            size = 0
    if current:
        flush()
    names = {f: f"{stem}-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in names.items():
        (folder / old).rename(folder / new)
    weight_map = {k: names[v] for k, v in weight_map.items()}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


CHILD = """
import json, resource, sys
import mlx.core as mx
from mlx_qwen_image.convert import convert
src, dst, bits, shard = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None, int(sys.argv[4])
convert(src, dst, bits=bits, max_shard_bytes=shard)
print(json.dumps({"peak": mx.get_peak_memory(), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def largest(folder: Path) -> int:
    return max(f.stat().st_size for f in folder.glob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--blocks", type=int, default=5)
    args = ap.parse_args()
    if args.folder.exists():
        sys.exit(f"{args.folder} exists")
    source = args.folder / "source"
    try:
        write_source(source, args.blocks)
        total = sum(f.stat().st_size for f in (source / "transformer").glob("*.safetensors"))
        biggest = largest(source / "transformer")
        print(f"source transformer: {total / 1e9:.2f} GB in shards of <= {biggest / 1e9:.2f} GB")
        for bits, shard in ((4, 5 * 10**9), (8, 5 * 10**9), (0, 5 * 10**9), (0, 10**9)):
            dst = args.folder / f"out-{bits}-{shard}"
            run = subprocess.run([sys.executable, "-c", CHILD, str(source), str(dst), str(bits), str(shard)],
                                 capture_output=True, text=True, check=True)
            stats = json.loads(run.stdout.strip().splitlines()[-1])
            out = sum(f.stat().st_size for f in (dst / "transformer").glob("*.safetensors"))
            print(f"{'float bf16' if not bits else f'{bits}-bit':<10} shards <= {shard / 1e9:.0f} GB: output "
                  f"{out / 1e9:.2f} GB (largest shard {largest(dst / 'transformer') / 1e9:.2f} GB), "
                  f"MLX peak {stats['peak'] / 1e9:.2f} GB, process peak RSS {stats['rss'] / 1e9:.2f} GB", flush=True)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
