"""The registry: what each supported checkpoint is, keyed by its ``model_index.json`` ``_class_name``.

One `Variant` says everything the rest of the code needs to know about a checkpoint: its component folders and
the model class of each, the text encoder's prompt template and how many template tokens it drops, whether the
text encoder needs its vision tower, how many edit pictures it takes and at what sizes, whether img2img applies,
its default steps / CFG / size, and the released parameter counts (for memory estimates before a download).
Loading, the pipeline, the CLI and the converter read it from here; a new variant is one entry plus its models.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from .config import read_json
from .loading import CheckpointError, check_layout, download, is_repo_id, local_folder

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

# Qwen-Image 2.1: the chat template of diffusers' QwenImage21Pipeline; the system turn's 14 tokens are dropped.
QWEN21_TEMPLATE = (
    "<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# Size presets (--aspect). Qwen-Image's are its published sizes; 2.1's are what its pipeline makes of an aspect
# (about 1024^2 pixels, or 2048^2 for "-2k", sides rounded to multiples of 32).
RATIOS = {"1:1": (1, 1), "16:9": (16, 9), "9:16": (9, 16), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2), "2:3": (2, 3)}
QWEN_IMAGE_ASPECTS = (("1:1", 1328, 1328), ("16:9", 1664, 928), ("9:16", 928, 1664), ("4:3", 1472, 1104),
                      ("3:4", 1104, 1472), ("3:2", 1584, 1056), ("2:3", 1056, 1584))


def _aspects_at(area: int, suffix: str = "") -> tuple[tuple[str, int, int], ...]:
    import math

    out = []
    for name, (a, b) in RATIOS.items():
        w = math.sqrt(area * a / b)
        out.append((name + suffix, round(w / 32) * 32, round(w / (a / b) / 32) * 32))
    return tuple(out)


QWEN21_ASPECTS = _aspects_at(1024 * 1024) + _aspects_at(2048 * 2048, "-2k")

TEXT_TO_IMAGE_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# The networks of each model family, as "module:class" under mlx_qwen_image.models (imported when first used).
MODEL_CLASSES = {
    "qwen-image": {"transformer": "transformer:QwenImageTransformer", "vae": "vae:QwenImageVAE",
                   "text_encoder": "text_encoder:QwenTextEncoder"},
    "qwen-image-2.1": {"transformer": "transformer21:QwenImage21Transformer", "vae": "vae21:QwenImage21VAE",
                       "text_encoder": "text_encoder21:Qwen3TextEncoder"},
}


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
    picture_separator: str = ""  # text between one picture's tokens and the next picture's label
    picture_mode: str = "RGB"  # the PIL mode pictures are read in (2.1: "RGBA", the VAE sees the alpha channel)
    optional_images: bool = False  # pictures optional: text-to-image without them, editing with them (2.1)
    condition_area: int | None = None  # pixels of a picture as the vision tower sees it; None: as the VAE does
    reference_area: int = 1024 * 1024  # pixels of a picture as the VAE encodes it; also the default output area
    img2img: bool = False
    steps: int = 50
    cfg_scale: float = 4.0
    size: tuple[int, int] = (1024, 1024)
    transformer_params: int = 20_430_401_088
    text_encoder_params: int = 7_070_619_136  # the language model, without the vision tower and lm_head
    download_bytes: int = 57_690_000_000  # what a first run downloads: the bf16 transformer, text encoder and VAE
    family: str = "qwen-image"  # which networks (MODEL_CLASSES) and which conventions below
    size_multiple: int = 16  # output sides are multiples of this
    cfg_rescale: bool = True  # CFG's result rescaled to the conditional prediction's norm (Qwen-Image), or plain
    blank_prompt: str | None = None  # what an empty prompt becomes (2.1: " ", as its encoder needs a token)
    tokenizer_folders: tuple[str, ...] = ("tokenizer",)  # where the tokenizer files are, the first that has them
    references_first: bool = False  # edit pictures' latents before the image's (2.1) or after them (Qwen-Image)
    step_caches: bool = True  # first-block / TaylorSeer / MagCache apply (the MMDiT's two-stream block loop)
    tensor_parallel: bool = True  # --parallel tensor can shard its blocks (the MMDiT's)
    kv_bytes_per_token: int = 0  # the prefix K/V cache per prefix token and CFG row in bf16 (2.1: 32 x 2 x 4096 x 2)
    stream_width: int = 3072  # the transformer's width and heads, for activation estimates before it is loaded
    attention_heads: int = 24
    lightning: bool = True  # the Lightning LoRAs' schedule (--lightning) is made for this transformer
    inpainting: bool = True  # mask= (the blend of `inpaint`, for the 8x VAE's packed latents)
    controlnet: bool = True  # Qwen-Image ControlNets feed its transformer (`control`)
    image_slots: bool = False  # 2.1: the image's tokens fill slots of the text sequence (`Conditioning.slots`)
    aspects: tuple[tuple[str, int, int], ...] = QWEN_IMAGE_ASPECTS  # (name, width, height) presets

    @property
    def edits(self) -> bool:
        """Whether it takes edit pictures."""
        return self.max_images > 0

    @property
    def needs_images(self) -> bool:
        """Whether every run needs edit pictures (an editing-only checkpoint)."""
        return self.edits and not self.optional_images

    @property
    def tasks(self) -> str:
        """What a run of this checkpoint can do, for messages."""
        n = "one picture" if self.max_images == 1 else f"1-{self.max_images} pictures"
        if self.needs_images:
            return f"image editing (images=[...], {n})"
        if self.edits:
            return f"text-to-image, and image editing with images=[...] ({n}; mlx-qwen-image edit --image FILE)"
        return "text-to-image" + (" and img2img (image= with strength=)" if self.img2img else "")

    def model_class(self, component: str):
        module, name = MODEL_CLASSES[self.family][component].split(":")
        return getattr(importlib.import_module(f".models.{module}", __package__), name)

    def tokenizer_folder(self, root: Path) -> Path:
        """The folder of ``root`` that holds the tokenizer files (2.1 keeps them in ``processor/``)."""
        for name in self.tokenizer_folders:
            folder = Path(root) / name
            if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
                return folder
        raise CheckpointError(f"incomplete checkpoint {root}: no tokenizer files (tokenizer.json, or vocab.json + "
                              f"merges.txt) in {' or '.join(f'{n}/' for n in self.tokenizer_folders)}")

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
        # Qwen-Image 2.1 and 2.1-Turbo (a fixed sigma grid in model_index.json's sample_sigmas).
        # Pictures are optional: each is a condition block, seen by the vision tower and the VAE at the same size.
        Variant("QwenImage21Pipeline", "Qwen-Image 2.1", components=("transformer", "vae", "text_encoder",
                "scheduler", "processor"), template=QWEN21_TEMPLATE, vision=True, max_images=10,
                picture_label="<image{}>", picture_separator=" ", picture_mode="RGBA", optional_images=True,
                kv_bytes_per_token=32 * 2 * 4096 * 2, stream_width=4096, attention_heads=32, drop=14,
                max_text_tokens=None, steps=40, cfg_scale=1.0,
                transformer_params=7_115_124_736, text_encoder_params=7_568_405_504,
                download_bytes=31_600_000_000, family="qwen-image-2.1", size_multiple=32, cfg_rescale=False,
                blank_prompt=" ", tokenizer_folders=("processor", "tokenizer"), references_first=True,
                step_caches=False, tensor_parallel=False, lightning=False, inpainting=False, controlnet=False,
                image_slots=True,
                aspects=QWEN21_ASPECTS),
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
        variant.tokenizer_folder(root)
        return root, variant
    repo = str(path_or_repo_id)
    try:
        variant = read_variant(download(repo))
        extra = variant.tokenizer_folders if variant.tokenizer_folders != ("tokenizer",) else ()
        root = download(repo, variant.components + extra, config_only)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the first run downloads about {expected.download_bytes / 1e9:.0f} GB (the "
                              "bf16 weights: --quantize quantizes them after the download)") from None
    try:
        check_layout(root, variant.components, config_only)
        variant.tokenizer_folder(root)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the download stopped part-way: run again to resume it)") from None
    return root, variant
