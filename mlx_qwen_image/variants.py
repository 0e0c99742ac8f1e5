"""The registry: what each supported checkpoint is, keyed by its ``model_index.json`` ``_class_name``.

One `Variant` says everything the rest of the code needs to know about a checkpoint: its component folders and
the model class of each, the text encoder's prompt template and how many template tokens it drops, whether the
text encoder needs its vision tower, how many edit pictures it takes and at what sizes, whether img2img applies,
its default steps / CFG / size, and the released parameter counts (for memory estimates before a download).
Loading, the pipeline, the CLI and the converter read it from here; a new variant is one entry plus its models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import read_json
from .loading import CheckpointError, check_layout, download, is_repo_id, local_folder
from .models.text_encoder import QwenTextEncoder
from .models.transformer import QwenImageTransformer
from .models.vae import QwenImageVAE

# Text-to-image: the first 34 tokens (the system turn and "<|im_start|>user\n") are dropped from the features,
# the 5 closing tokens ("<|im_end|>\n<|im_start|>assistant\n") are kept.
TEXT_TO_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_SUFFIX_TOKENS = 5  # "<|im_end|>\n<|im_start|>assistant\n", the same in both templates
PICTURE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"

TEXT_TO_IMAGE_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_CLASSES = {"transformer": QwenImageTransformer, "vae": QwenImageVAE, "text_encoder": QwenTextEncoder}


@dataclasses.dataclass(frozen=True)
class Variant:
    class_name: str
    name: str  # for messages
    components: tuple[str, ...] = TEXT_TO_IMAGE_COMPONENTS
    template: str = TEXT_TO_IMAGE_TEMPLATE
    drop: int = 34  # leading template tokens whose features are dropped
    max_text_tokens: int | None = 1024  # features per prompt (prompt tokens + closing template tokens)
    vision: bool = False  # the text encoder sees the edit pictures through its vision tower
    max_images: int = 0  # edit pictures taken; 0: not an editing checkpoint
    picture_label: str = ""  # text before each picture's tokens; {} is its number (1, 2, ...)
    condition_area: int | None = None  # pixels of a picture as the vision tower sees it; None: as the VAE does
    reference_area: int = 1024 * 1024  # pixels of a picture as the VAE encodes it; also the default output area
    img2img: bool = False
    steps: int = 50
    cfg_scale: float = 4.0
    size: tuple[int, int] = (1024, 1024)
    transformer_params: int = 20_430_401_088
    text_encoder_params: int = 7_070_619_136  # the language model, without the vision tower and lm_head
    download_bytes: int = 57_690_000_000  # what a first run downloads: the bf16 transformer, text encoder and VAE

    @property
    def edits(self) -> bool:
        return self.max_images > 0

    @property
    def tasks(self) -> str:
        """What a run of this checkpoint can do, for messages."""
        if self.edits:
            n = "one picture" if self.max_images == 1 else f"1-{self.max_images} pictures"
            return f"image editing (images=[...], {n})"
        return "text-to-image" + (" and img2img (image= with strength=)" if self.img2img else "")

    def model_class(self, component: str):
        return MODEL_CLASSES[component]

    def build_options(self, component: str) -> dict:
        """Keyword arguments for ``from_config`` of a component's model."""
        return {"vision": self.vision} if component == "text_encoder" else {}

    @property
    def model_components(self) -> tuple[str, ...]:
        """The components with weights, in the order they are loaded and converted."""
        return tuple(c for c in ("text_encoder", "transformer", "vae") if c in self.components)


_T2I = dict(img2img=True)
_EDIT = dict(components=TEXT_TO_IMAGE_COMPONENTS + ("processor",), template=EDIT_TEMPLATE, drop=64,
             max_text_tokens=None, vision=True)

VARIANTS: dict[str, Variant] = {
    v.class_name: v
    for v in (
        # Qwen-Image and Qwen-Image-2512 share the class and the layout.
        Variant("QwenImagePipeline", "Qwen-Image text-to-image", **_T2I),
        Variant("QwenImageImg2ImgPipeline", "Qwen-Image img2img", **_T2I),
        # The original Edit: one picture, seen by the vision tower at the size the VAE encodes it.
        Variant("QwenImageEditPipeline", "Qwen-Image-Edit", max_images=1, **_EDIT),
        # Edit-2509 and Edit-2511 (zero_cond_t comes from the transformer's own config).
        Variant("QwenImageEditPlusPipeline", "Qwen-Image-Edit-2509/2511", max_images=3,
                picture_label="Picture {}: ", condition_area=384 * 384, **_EDIT),
    )
}
DEFAULT_TEXT_TO_IMAGE = VARIANTS["QwenImagePipeline"]
DEFAULT_EDIT = VARIANTS["QwenImageEditPlusPipeline"]


def lookup(class_name: str, where: str | Path = "this checkpoint") -> Variant:
    """The variant for a ``_class_name``; anything else is refused naming what is supported."""
    if class_name not in VARIANTS:
        supported = ", ".join(VARIANTS)
        raise CheckpointError(f"{where} is a {class_name or 'unnamed'} checkpoint, which mlx-qwen-image does not run "
                              f"(supported model_index.json classes: {supported})")
    return VARIANTS[class_name]


def read_variant(root: Path) -> Variant:
    """The variant of a local checkpoint folder, from its ``model_index.json``."""
    index_file = Path(root) / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{root} is not a diffusers checkpoint: model_index.json is missing")
    name = read_json(index_file).get("_class_name", "")
    return lookup(name if isinstance(name, str) else repr(name), root)


def locate(path_or_repo_id: str | Path, expected: Variant = DEFAULT_TEXT_TO_IMAGE,
           config_only=()) -> tuple[Path, Variant]:
    """The checkpoint folder and its variant, checked complete: a local folder, or a Hub repo downloaded with only
    the components its variant needs (``model_index.json`` first, to know which). ``expected`` is the variant a
    download is assumed to be when the Hub cannot be reached, for the size it would take. Of the ``config_only``
    components (weights from elsewhere, e.g. a GGUF file) only the config is needed."""
    if not is_repo_id(path_or_repo_id):
        root = local_folder(path_or_repo_id)
        variant = read_variant(root)
        check_layout(root, variant.components, config_only)
        return root, variant
    repo = str(path_or_repo_id)
    try:
        variant = read_variant(download(repo))
        root = download(repo, variant.components, config_only)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the first run downloads about {expected.download_bytes / 1e9:.0f} GB (the "
                              "bf16 weights: --quantize quantizes them after the download)") from None
    try:
        check_layout(root, variant.components, config_only)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the download stopped part-way: run again to resume it)") from None
    return root, variant
