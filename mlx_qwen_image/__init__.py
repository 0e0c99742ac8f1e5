"""Qwen-Image on Apple Silicon through MLX.

``from mlx_qwen_image import QwenImagePipeline`` is the public entry point; the pipeline module is
imported on first use so that ``import mlx_qwen_image`` (and the CLI's ``--help``) stays instant.
"""

__version__ = "0.1.0"

__all__ = ["QwenImagePipeline", "__version__"]


def __getattr__(name):
    if name == "QwenImagePipeline":
        from .pipeline import QwenImagePipeline

        return QwenImagePipeline
    raise AttributeError(f"module 'mlx_qwen_image' has no attribute {name!r}")
