"""The converter: a diffusers-layout Qwen-Image checkpoint -> an MLX checkpoint, float or 4/8-bit.

Installed as ``mlx_qwen_image.convert`` (a setuptools ``package-dir`` entry in pyproject.toml), so that a plain
install ships it without a top-level module named ``convert``; ``mlx-qwen-image convert`` runs it.
"""

from .converter import MAX_SHARD_BYTES, convert

__all__ = ["MAX_SHARD_BYTES", "convert"]
