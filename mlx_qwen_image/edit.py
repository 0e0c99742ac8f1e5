"""Image editing (Qwen-Image-Edit, Edit-2509, Edit-2511) is ``QwenImagePipeline.generate(prompt, images=[...])``
on an editing checkpoint; what each editing variant takes is in `variants`, how the pictures enter the run in
`conditioning.edit`. `QwenImageEditPipeline` is kept as an alias that loads editing checkpoints only.
"""

from __future__ import annotations

from pathlib import Path

from .loading import CheckpointError
from .pipeline import QwenImagePipeline
from .variants import Variant

EDIT_CLASS, PLUS_CLASS = "QwenImageEditPipeline", "QwenImageEditPlusPipeline"


class QwenImageEditPipeline(QwenImagePipeline):
    """`QwenImagePipeline` for editing checkpoints only, with ``edit(prompt, images)``."""

    @classmethod
    def _check_variant(cls, root: Path, variant: Variant):
        if not variant.edits:
            raise CheckpointError(f"{root} is a text-to-image checkpoint ({variant.class_name}): load it with "
                                  "QwenImagePipeline (or `mlx-qwen-image generate`)")
