"""LoRA files against diffusers + peft on a tiny transformer, the other published spellings, quantized bases,
and the Lightning scheduler preset against diffusers' scheduler."""

import copy
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import randomize_, rel_err, torch_weights
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from test_transformer import TINY, _inputs, _run_both

from mlx_qwen_image.lora import LoRALinear, apply_lora, fuse_lora_weights, load_lora, parse_lora_arg
from mlx_qwen_image.models.transformer import QwenImageTransformer
from mlx_qwen_image.scheduler import LIGHTNING_SCHEDULER_CONFIG, FlowMatchEulerScheduler, lightning_scheduler

BLOCK_LAYERS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
]  # fmt: skip
OUTER_LAYERS = ["img_in", "txt_in", "proj_out", "norm_out.linear", "timestep_embedder.linear_1", "to_q"]
INPUTS = _inputs([(1, 3, 5)], 6, 2, mask_lengths=[6, 4])
pytestmark = [  # peft takes a lora_B bias for an unsharded-save mistake; two adapters on one model are intended
    pytest.mark.filterwarnings("ignore:Adapter 'x'.*invalid shape"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config`"),
]


@pytest.fixture(scope="module")
def base():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return randomize_(QwenImageTransformer2DModel(**TINY).eval(), seed=0)


def _save_peft_lora(base, folder, seed, metadata=True, pipeline="QwenImagePipeline", **config):
    """A random (non-zero B) PEFT LoRA for ``base``, written with the diffusers pipeline's save_lora_weights."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(base)
    model.add_adapter(LoraConfig(**config), adapter_name="x")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    getattr(diffusers, pipeline).save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(model, adapter_name="x"),
        transformer_lora_adapter_metadata=model.peft_config["x"].to_dict() if metadata else None,
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    # "a": every linear of the blocks, alpha 8 on rank 4 from the stored adapter config, alpha 2 for to_k.
    a = _save_peft_lora(base, root / "a", 1, r=4, lora_alpha=8, alpha_pattern={"to_k": 2}, target_modules=BLOCK_LAYERS)
    # "b": rank 2, the outer layers, a LoRA bias, no stored config (alpha = rank).
    b = _save_peft_lora(base, root / "b", 2, metadata=False, r=2, lora_bias=True, target_modules=OUTER_LAYERS)
    return {"a": a, "b": b, "root": root}


def _ours(base):
    model = QwenImageTransformer.from_config(TINY)
    model.load_weights(list(torch_weights(base).items()), strict=True)
    return model


def _diffusers_with(base, applied):
    """diffusers' QwenImagePipeline.load_lora_weights + set_adapters on a copy of ``base``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, copy.deepcopy(base))
    names = [f"l{i}" for i in range(len(applied))]
    for name, (path, _) in zip(names, applied):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, [scale for _, scale in applied])
    return pipe.transformer


def _params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("which", [[("a", 1.0)], [("a", 0.5)], [("b", 1.0)], [("a", 1.0), ("b", 0.7)]])
def test_parity_with_diffusers(base, loras, which):
    applied = [(loras[name], scale) for name, scale in which]
    ours = _ours(base)
    plain, _ = _run_both(base, ours, *INPUTS)
    assert apply_lora(ours, applied) > 0
    got, expected = _run_both(_diffusers_with(base, applied), ours, *INPUTS)
    assert rel_err(got, expected) < 1e-4
    assert rel_err(plain, expected) > 2e-2  # the LoRA matters: the check above is not vacuous


def _respell(path, spelling):
    """LoRA "a" (diffusers spelling, alpha 8 / to_k 2 on rank 4 in its adapter config) in another spelling."""
    tensors = load_file(str(path))
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        down, up = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        alpha = 2.0 if module.endswith("to_k") else 8.0
        if spelling == "kohya":  # alpha 3 for every layer: up carries the rest
            name = "lora_unet_" + module.replace(".", "_")
            out |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up * (alpha / 3.0),
                    f"{name}.alpha": np.array(3.0, np.float32)}
        elif spelling == "diffusion_model":
            name = "diffusion_model." + module
            out |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.alpha": np.array(alpha)}
        elif spelling == "lightning":  # bare names, lora_down/lora_up, a (1,) float16 alpha
            out |= {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                    f"{module}.alpha": np.array([alpha], np.float16)}
        elif spelling == "peft_default":  # no alpha anywhere means scale 1: up carries alpha / r
            name = "transformer." + module
            out |= {f"{name}.lora_A.default.weight": down, f"{name}.lora_B.default.weight": up * (alpha / 4)}
    target = path.parent.parent / f"{spelling}.safetensors"
    save_file({k: np.ascontiguousarray(v, dtype=v.dtype if v.dtype == np.float16 else np.float32)
               for k, v in out.items()}, str(target))
    return target


@pytest.mark.parametrize("spelling", ["kohya", "diffusion_model", "lightning", "peft_default"])
def test_other_spellings_give_the_same_weights(base, loras, spelling):
    expected = _ours(base)
    apply_lora(expected, [(loras["a"], 0.8)])
    respelled = _respell(loras["a"], spelling)
    got = _ours(base)
    apply_lora(got, [(respelled, 0.8)])
    want, have = _params(expected), _params(got)
    for name in want:
        np.testing.assert_allclose(have[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    if spelling in ("kohya", "diffusion_model"):  # diffusers reads these spellings the same way
        ours_out, ref_out = _run_both(_diffusers_with(base, [(respelled, 0.8)]), got, *INPUTS)
        assert rel_err(ours_out, ref_out) < 1e-4


def test_checkpoint_dict_fusion_equals_model_fusion(base, loras):
    applied = [(loras["a"], 1.0), (loras["b"], -0.5)]
    model = _ours(base)
    apply_lora(model, applied)
    fused = fuse_lora_weights(torch_weights(base), applied)
    from_dict = QwenImageTransformer.from_config(TINY)
    from_dict.load_weights(list(fused.items()), strict=True)
    for name, value in _params(model).items():
        np.testing.assert_array_equal(_params(from_dict)[name], value, err_msg=name)


def test_fusion_keeps_the_dtype_and_rounds_once(base, loras):
    model = _ours(base)
    model.set_dtype(mx.bfloat16)
    w0 = model.transformer_blocks[0].attn.to_q.weight
    apply_lora(model, [(loras["a"], 1.0), (loras["a"], 1.0)])
    w = model.transformer_blocks[0].attn.to_q.weight
    layer = load_lora(loras["a"]).layers["transformer_blocks.0.attn.to_q"]
    delta = 2 * layer.scale * (layer.up.astype(mx.float32) @ layer.down.astype(mx.float32))
    assert w.dtype == mx.bfloat16
    assert mx.array_equal(w, (w0.astype(mx.float32) + delta).astype(mx.bfloat16))


def _lora_dict(path):
    return {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d | {"transformer_blocks.5.attn.to_q.lora_A.weight": np.zeros((4, 64), np.float32),
                        "transformer_blocks.5.attn.to_q.lora_B.weight": np.zeros((64, 4), np.float32)},
         r"1 LoRA layers match no linear layer of the transformer: transformer_blocks\.5\.attn\.to_q"),
        (lambda d: d | {"transformer_blocks.0.attn.to_q.lora_magnitude_vector": np.zeros(64, np.float32)},
         r"1 keys are not LoRA weights .*lora_magnitude_vector.*DoRA"),
        (lambda d: d | {"transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((4, 65), np.float32)},
         r"do not fit the transformer's shapes: transformer_blocks\.0\.attn\.to_q \(layer 64x64, LoRA 64x65\)"),
        (lambda d: {k: v for k, v in d.items() if k != "transformer_blocks.1.img_mlp.net.2.lora_B.weight"},
         r"down \(r, in\) and up \(out, r\).*transformer_blocks\.1\.img_mlp\.net\.2"),
    ],
    ids=["unmatched", "unknown-key", "wrong-shape", "missing-up"],
)
def test_bad_loras_are_refused_and_change_nothing(base, loras, change, message):
    model = _ours(base)
    before = _params(model)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, [(loras["b"], 1.0), (change(_lora_dict(loras["a"])), 1.0)])
    for name, value in _params(model).items():
        np.testing.assert_array_equal(value, before[name])


def test_unsafe_or_missing_files_are_refused(tmp_path):
    (tmp_path / "lora.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="only as .safetensors"):
        load_lora(tmp_path / "lora.ckpt")
    with pytest.raises(ValueError, match="no such LoRA file"):
        load_lora(tmp_path / "absent.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_lora(tmp_path / "cut.safetensors")


def test_parse_lora_arg():
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_lora_arg("C:/loras/x.safetensors:-1") == ("C:/loras/x.safetensors", -1.0)
    for bad, message in (("x.safetensors:abc", "the scale 'abc' is not a number"),
                         ("x.safetensors:nan", "must be a finite number, got nan"),
                         ("x.safetensors:inf", "must be a finite number"), ("x.safetensors:1e400", "finite")):
        with pytest.raises(ValueError, match=message):
            parse_lora_arg(bad)


def test_non_finite_and_integer_loras_are_refused(base, tmp_path):
    rng = np.random.default_rng(0)
    good = {"transformer.img_in.lora_A.weight": rng.normal(size=(2, 16)).astype(np.float32),
            "transformer.img_in.lora_B.weight": rng.normal(size=(32, 2)).astype(np.float32)}
    nan = dict(good, **{"transformer.img_in.lora_B.weight": np.full((32, 2), np.nan, np.float32)})
    ints = dict(good, **{"transformer.img_in.lora_A.weight": np.ones((2, 16), np.int32)})
    for tensors, message in ((nan, "hold NaN or infinite values"), (ints, "hold integer tensors")):
        save_file(tensors, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_lora(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="LoRA scale nan .* must be a finite number"):
        apply_lora(_ours(base), [(good, float("nan"))])


def _quantize(model):
    # The tiny model's 64-wide (and wider) inputs quantize; the 16- and 24-wide input layers stay float.
    nn.quantize(model, 64, 4, class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 64 == 0)
    return model


def _dequantized(base):
    """The float model whose weights are the 4-bit model's, dequantized."""
    model = _ours(base)
    weights = [
        (f"{path}.weight", mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits))
        for path, m in _quantize(_ours(base)).named_modules()
        if isinstance(m, nn.QuantizedLinear)
    ]
    model.load_weights(weights, strict=False)
    return model


def _out(model):
    x, txt, mask, sigma, shapes = INPUTS
    return np.array(model(mx.array(x), mx.array(txt), mx.array(mask), mx.array(sigma), shapes).astype(mx.float32))


def test_quantized_bases(base, loras):
    applied = [(loras["a"], 1.0), (loras["b"], 1.0)]
    exact = _ours(base)
    apply_lora(exact, applied)
    exact = _out(exact)
    quant_error = rel_err(_out(_quantize(_ours(base))), _out(_ours(base)))

    added = _quantize(_ours(base))
    apply_lora(added, applied)
    assert isinstance(added.transformer_blocks[0].attn.to_q, LoRALinear)
    assert isinstance(added.img_in, nn.Linear)  # float layers of a mixed model are still fused
    # The low-rank add is exactly "dequantize, then fuse": nothing but the base's quantization is lost ...
    reference = _dequantized(base)
    apply_lora(reference, applied)
    assert rel_err(_out(added), _out(reference)) < 1e-5
    # ... so it is as far from the exact float result as quantizing the base alone is from the float base.
    assert rel_err(_out(added), exact) < 1.5 * quant_error

    before = _ours(base)  # fuse, then quantize (quantizing on load, or convert --lora)
    apply_lora(before, applied)
    assert rel_err(_out(_quantize(before)), exact) < 1.5 * quant_error

    # A second LoRA on an already wrapped layer stacks onto the same wrapper.
    twice = _quantize(_ours(base))
    apply_lora(twice, applied[:1])
    apply_lora(twice, applied[1:])
    assert rel_err(_out(twice), _out(added)) < 1e-5
    assert twice.transformer_blocks[0].attn.to_q.down.shape[0] == 4 + 2

    half = _ours(base)
    half.set_dtype(mx.bfloat16)
    apply_lora(_quantize(half), applied)
    assert half.transformer_blocks[0].attn.to_q.down.dtype == mx.bfloat16
    assert rel_err(_out(half), _out(added)) < 3e-2


def _diffusers_sigmas(config, steps, width, height):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    seq_len = (height // 16) * (width // 16)
    c = ref.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return ref.sigmas.numpy(), ref.timesteps.numpy(), seq_len


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("width, height", [(1024, 1024), (1664, 928)])
def test_lightning_sigmas_equal_diffusers(steps, width, height):
    sigmas, timesteps, seq_len = _diffusers_sigmas(LIGHTNING_SCHEDULER_CONFIG, steps, width, height)
    ours = lightning_scheduler()
    np.testing.assert_allclose(ours.sigmas(steps, seq_len), sigmas, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours.timesteps(steps, seq_len), timesteps, atol=1e-3, rtol=1e-6)
    # A fixed shift of 3 at every size: sigma' = 3 s / (1 + 2 s), and no terminal stretch.
    s = np.linspace(1, 1 / steps, steps)
    np.testing.assert_allclose(sigmas[:-1], 3 * s / (1 + 2 * s), atol=1e-6)
    assert isinstance(ours, FlowMatchEulerScheduler) and sigmas[-1] == 0


@pytest.mark.parametrize("how", ["from_pretrained", "load_lora", "fused directly"])
def test_a_lora_on_the_timestep_path_survives_low_memory_runs(tiny_checkpoint, tmp_path, how):
    """A LoRA on img_mod/txt_mod: two low-memory runs both equal diffusers with that LoRA, whichever way it was
    applied; the freed weights come back with the LoRA when the pipeline applied it, and are never freed when the
    model was changed behind the pipeline's back."""
    from diffusers import QwenImagePipeline as Reference

    from mlx_qwen_image import QwenImagePipeline
    from mlx_qwen_image.conditioning import StepHook

    folder, reference = tiny_checkpoint
    lora = _save_peft_lora(reference.transformer, tmp_path, 5, r=2, lora_alpha=2,
                           target_modules=["img_mod.1", "txt_mod.1", "to_q"])
    ref = Reference(**{**reference.components, "transformer": copy.deepcopy(reference.transformer)})
    ref.load_lora_weights(str(lora), adapter_name="l")
    width, height, steps = 32, 48, 2
    latents = np.random.default_rng(6).standard_normal((1, (height // 16) * (width // 16), 16)).astype(np.float32)
    with torch.no_grad():
        expected = ref(prompt="a lamp", negative_prompt=" ", true_cfg_scale=2.0, width=width, height=height,
                       num_inference_steps=steps, latents=torch.from_numpy(latents), output_type="np").images[0]
        plain = reference(prompt="a lamp", negative_prompt=" ", true_cfg_scale=2.0, width=width, height=height,
                          num_inference_steps=steps, latents=torch.from_numpy(latents), output_type="np").images[0]

    if how == "from_pretrained":
        ours = QwenImagePipeline.from_pretrained(folder, dtype="float32", loras=[(lora, 1.0)])
    else:
        ours = QwenImagePipeline.from_pretrained(folder, dtype="float32")
        if how == "load_lora":
            ours.load_lora(lora)
        else:
            apply_lora(ours.transformer, [(lora, 1.0)])

    class Watch(StepHook):
        def predict(self, step, sigma, compute):
            self.dropped = ours.transformer.modulation_weights_dropped
            return compute()

    for _ in range(2):
        watch = Watch()
        got = ours.generate("a lamp", width=width, height=height, steps=steps, cfg_scale=2.0, latents=latents,
                            output="np", low_memory=True, hooks=[watch])
        assert rel_err(got - 0.5, expected - 0.5) < 1e-3
        assert watch.dropped == (how != "fused directly")
        assert not ours.transformer.modulation_weights_dropped
    assert rel_err(plain - 0.5, expected - 0.5) > 1e-2  # the LoRA matters


def test_a_lora_beside_quantized_timestep_layers_keeps_them_in_memory(tiny_checkpoint, tmp_path):
    from mlx_qwen_image import QwenImagePipeline

    folder, reference = tiny_checkpoint
    lora = _save_peft_lora(reference.transformer, tmp_path, 7, r=2, lora_alpha=2, target_modules=["img_mod.1"])
    pipe = QwenImagePipeline.from_pretrained(folder, dtype="float32")
    # The tiny layers are too narrow for the recipe's group size: quantize img_mod as a converted checkpoint would.
    nn.quantize(pipe.transformer, group_size=32, bits=8, class_predicate=lambda path, _: path.endswith("img_mod.1"))
    with pytest.raises(RuntimeError, match="holds an array made lazily in another thread; evaluate it there first"):
        pipe.generate("a lamp", width=32, height=32, steps=1)
    mx.eval(pipe.transformer.parameters())  # made in this thread: evaluated here, before the owner thread uses it
    pipe.transformer.mark_timestep_path()
    assert pipe.transformer.timestep_path_marked
    pipe.load_lora(lora)  # quantized layers: the LoRA runs beside them, which a reload from disk would lose
    assert isinstance(pipe.transformer.transformer_blocks[0].img_mod[1], LoRALinear)
    assert not pipe.transformer.timestep_path_marked
    args = dict(width=32, height=32, steps=2, cfg_scale=2.0, seed=4, output="np")
    np.testing.assert_array_equal(pipe.generate("a lamp", low_memory=True, **args),
                                  pipe.generate("a lamp", low_memory=False, **args))


def test_qwen21_loras_equal_diffusers_in_both_spellings(tmp_path):
    """A 2.1 LoRA (attention, the SwiGLU, the shared modulation) as diffusers loads it, and the same LoRA in
    ComfyUI's layout with the fused ``img_mlp.gate_up`` (gate_layer and proj sharing one down matrix)."""
    from safetensors.torch import load_file as load_torch
    from test_transformer21 import _case, _ours, _pair, _ref

    ref, ours = _pair(seed=4)
    layers = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.gate_layer", "img_mlp.proj", "img_mlp.out", "modulation.1"]
    path = _save_peft_lora(ref, tmp_path / "a", 7, pipeline="QwenImage21Pipeline", r=4, lora_alpha=8,
                           target_modules=layers)
    tensors = load_file(str(path))
    for key in [k for k in tensors if ".img_mlp.gate_layer.lora_A" in k]:  # one down for the fused pair
        tensors[key.replace("gate_layer", "proj")] = tensors[key]
    save_file(tensors, str(path), metadata=_metadata(path))
    c = _case([("text", 6)], (4, 4))
    plain = _ref(ref, c)
    adapted = copy.deepcopy(ref)  # as QwenImage21Pipeline.load_lora_weights loads it into the transformer
    adapted.load_lora_adapter(load_torch(str(path)), prefix="transformer", adapter_name="l0",
                              metadata=json.loads(_metadata(path)["lora_adapter_metadata"]))
    expected = _ref(adapted, c)
    assert rel_err(plain, expected) > 2e-2  # the LoRA matters
    assert apply_lora(ours, [(path, 1.0)]) == 2 * 8 - 1  # 2 blocks x 7 layers + the shared modulation
    assert rel_err(_ours(ours, c), expected) < 1e-4

    comfy = {}
    for key, value in tensors.items():
        module = key.removeprefix("transformer.").split(".lora_")[0]
        kind = "lora_down" if ".lora_A." in key else "lora_up"
        if module.endswith("img_mlp.proj"):
            continue
        if module.endswith("img_mlp.gate_layer"):
            module = module.replace("gate_layer", "gate_up")
            if kind == "lora_up":
                value = np.concatenate([value, tensors[key.replace("gate_layer", "proj")]])
        comfy[f"diffusion_model.{module}.{kind}.weight"] = value
        comfy[f"diffusion_model.{module}.alpha"] = np.array(8.0, np.float32)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    _, fresh = _pair(seed=4)
    assert apply_lora(fresh, [(tmp_path / "comfy.safetensors", 1.0)]) == 15
    assert rel_err(_ours(fresh, c), expected) < 1e-4


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return f.metadata()
