"""The registry: every supported model_index.json class, what it says about each, and refusals."""

import json
import shutil

import pytest
from conftest import RELEASED

from mlx_qwen_image.loading import CheckpointError
from mlx_qwen_image.models.text_encoder import QwenTextEncoder
from mlx_qwen_image.variants import VARIANTS, locate, lookup, read_variant


def test_every_published_class_is_registered_with_its_facts():
    assert set(VARIANTS) == {"QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageEditPipeline",
                             "QwenImageEditPlusPipeline", "QwenImage21Pipeline"}
    t2i, edit, plus = (VARIANTS[k] for k in ("QwenImagePipeline", "QwenImageEditPipeline",
                                             "QwenImageEditPlusPipeline"))
    assert (t2i.drop, t2i.vision, t2i.max_images, t2i.img2img) == (34, False, 0, True)
    assert (edit.drop, edit.vision, edit.max_images, edit.condition_area) == (64, True, 1, None)
    assert (plus.drop, plus.max_images, plus.condition_area, plus.picture_label) == (64, 3, 384 * 384, "Picture {}: ")
    assert "processor" in plus.components and "processor" not in t2i.components
    assert t2i.model_class("text_encoder") is QwenTextEncoder
    assert plus.build_options("text_encoder") == {"vision": True} and t2i.build_options("vae") == {}


def test_the_released_model_index_names_a_registered_variant():
    index = json.loads((RELEASED / "model_index.json").read_text())
    assert read_variant(RELEASED).class_name == index["_class_name"] == "QwenImagePipeline"


def test_unknown_and_damaged_indexes_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="QwenImageLayeredPipeline checkpoint, which mlx-qwen-image does not "
                                              "run .*supported model_index.json classes: QwenImagePipeline"):
        lookup("QwenImageLayeredPipeline")
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object"):
        read_variant(tmp_path)
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        read_variant(tmp_path / "nowhere")


def test_locate_checks_the_components_of_the_variant(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    root, variant = locate(folder)
    assert root == folder and variant.class_name == "QwenImagePipeline"
    edit = tmp_path / "edit"
    shutil.copytree(folder, edit)
    (edit / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    with pytest.raises(CheckpointError, match="missing processor/"):  # editing needs the processor folder
        locate(edit)


def test_a_half_downloaded_snapshot_says_to_download_again(tiny_checkpoint, tmp_path, monkeypatch):
    import mlx_qwen_image.variants as variants

    partial = tmp_path / "snapshot"
    shutil.copytree(tiny_checkpoint[0], partial)
    shutil.rmtree(partial / "vae")
    monkeypatch.setattr(variants, "download", lambda repo, components=None, config_only=(): partial)
    with pytest.raises(CheckpointError, match=r"missing vae/ \(the download stopped part-way: run again to resume"):
        locate("someone/some-model")
