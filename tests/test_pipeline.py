"""End to end: our text-to-image pipeline against diffusers' QwenImagePipeline from the same noise."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import rel_err

from mlx_qwen_image import QwenImagePipeline
from mlx_qwen_image.loading import CheckpointError


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    folder, reference = tiny_checkpoint
    return QwenImagePipeline.from_pretrained(folder, dtype="float32"), reference


def _noise(batch, width, height, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, (height // 16) * (width // 16), 16)).astype(np.float32)


def _reference(reference, prompt, latents, cfg_scale, width, height, steps, output_type="np"):
    with torch.no_grad():
        out = reference(
            prompt=prompt,
            negative_prompt=" " if cfg_scale > 1 else None,
            true_cfg_scale=cfg_scale,
            width=width,
            height=height,
            num_inference_steps=steps,
            latents=torch.from_numpy(latents),
            output_type=output_type,
        ).images
    return out.numpy() if output_type == "latent" else out


@pytest.mark.parametrize(
    "prompt, cfg_scale, width, height, steps",
    [
        ("a red bicycle leaning on a wall", 4.0, 96, 64, 3),  # CFG on, non-square
        ("a red bicycle leaning on a wall", 1.0, 64, 96, 3),  # CFG off
        ("一只在雨中撑伞的猫，招牌上写着“咖啡”", 2.5, 64, 64, 4),  # Chinese
        (["a poster that says HELLO", "two cats"], 4.0, 96, 64, 3),  # batch of 2 prompts of different lengths
    ],
)
def test_generate_equals_diffusers(pipes, prompt, cfg_scale, width, height, steps):
    ours, reference = pipes
    batch = 1 if isinstance(prompt, str) else len(prompt)
    latents = _noise(batch, width, height)
    expected = _reference(reference, prompt, latents, cfg_scale, width, height, steps)
    got = ours.generate(prompt, width=width, height=height, steps=steps, cfg_scale=cfg_scale, latents=latents,
                        output="np")
    got = got[None] if isinstance(prompt, str) else got
    assert got.shape == expected.shape == (batch, height, width, 3)
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
    # Compared in [-1, 1] about the mid-grey the tiny VAE hovers around, so the error is not diluted.
    assert rel_err(got - 0.5, expected - 0.5) < 1e-3


def test_final_latents_equal_diffusers(pipes):
    ours, reference = pipes
    latents = _noise(1, 64, 96, seed=3)
    expected = _reference(reference, "neon sign", latents, 4.0, 64, 96, 3, output_type="latent")
    *_, got = ours.denoise("neon sign", width=64, height=96, steps=3, cfg_scale=4.0, latents=latents)
    assert rel_err(np.array(got), expected) < 1e-4


class CountingTransformer:
    """Delegates to the transformer and records the batch size of each call."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, *args, **kwargs):
        self.batches.append(x.shape[0])
        return self.model(x, *args, **kwargs)


@pytest.mark.parametrize("cfg_scale, rows_per_prompt", [(4.0, 2), (1.0, 1)])
def test_one_transformer_call_per_step(pipes, cfg_scale, rows_per_prompt):
    ours, _ = pipes
    counter = CountingTransformer(ours.transformer)
    ours.transformer = counter
    try:
        ours.generate(["a", "bb"], width=32, height=32, steps=5, cfg_scale=cfg_scale, output="np")
    finally:
        ours.transformer = counter.model
    assert counter.batches == [2 * rows_per_prompt] * 5


def test_seeds_and_low_memory(pipes):
    ours, _ = pipes
    a = ours.generate("seed test", width=32, height=32, steps=2, seed=7, output="np")
    ours.low_memory = True
    try:
        b = ours.generate("seed test", width=32, height=32, steps=2, seed=7, output="np")
        assert ours.text_encoder is None  # released after encoding ...
        c = ours.generate("seed test", width=32, height=32, steps=2, seed=8, output="np")
        assert ours.text_encoder is None  # ... not reloaded for another seed of the same prompt ...
        d = ours.generate("another prompt", width=32, height=32, steps=2, seed=7, output="np")  # ... reloaded here
    finally:
        ours.low_memory = False
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - d).max() > 1e-3
    run = ours.denoise("another prompt", width=32, height=32, steps=2, seed=7)
    np.testing.assert_array_equal(d, run.complete("np")[0])
    assert set(run.stats) == {"text_encoder", "modulation_table", "steps", "denoise", "decode"}
    assert len(run.stats["steps"]) == 2 and not hasattr(ours, "stats")  # the run's own stats, not the pipeline's
    # The last run reused the cached prompt features: its text phase allocated nothing.
    assert run.stats["text_encoder"]["peak_memory"] == 0
    assert run.stats["denoise"]["peak_memory"] > 0 and run.stats["decode"]["peak_memory"] > 0


def test_pil_output(pipes):
    ours, _ = pipes
    image = ours.generate("pil", width=48, height=32, steps=1, cfg_scale=1.0)
    assert image.size == (48, 32) and image.mode == "RGB"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=100), "multiple of 16; use 96 or 112"),
        (dict(height=8), "multiple of 16; use 16"),
        (dict(steps=0), "steps must be at least 1"),
        (dict(cfg_scale=0.5), "cfg_scale must be a number of at least 1"),
        (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number, got nan"),
        (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number, got inf"),
        (dict(width=0), "width 0 is not a multiple of 16; use 16"),
        (dict(width=32.0), "width must be an integer, got 32.0"),
        (dict(steps=2.5), "steps must be an integer, got 2.5"),
        (dict(seed=None), "seed must be an integer, got None"),
        (dict(prompt=None), "prompt must be a string or a non-empty list of strings, got None"),
        (dict(prompt=b"bytes"), "prompt must be a string or a non-empty list of strings, got b'bytes'"),
        (dict(prompt=["a", None]), "prompt must be a string or a non-empty list of strings"),
        (dict(prompt="bad \udc80 text"), "prompt is not valid text: it holds .* at position 4 .*not UTF-8"),
        (dict(negative_prompt=7, cfg_scale=2.0), "negative_prompt must be a string"),
        (dict(width=100000, height=100000), "needs about .* GB for the run's activations alone .* the largest size"),
        (dict(images=["a.png"]), r"takes no edit pictures; it does text-to-image and img2img"),
        (dict(prompt=[]), "non-empty list of strings"),
        (dict(latents=np.zeros((1, 3, 16), np.float32)), "latents have shape"),
        (dict(output="jpeg"), "output must be"),
        (dict(seed=-1), "seed must be in"),
    ],
)
def test_bad_requests_are_refused(pipes, kwargs, message):
    ours, _ = pipes
    args = dict(prompt="x", width=32, height=32, steps=1, cfg_scale=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        ours.generate(**args)


def test_missing_and_damaged_checkpoints(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    with pytest.raises(CheckpointError, match="does not exist"):
        QwenImagePipeline.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="missing vae/"):
        QwenImagePipeline.from_pretrained(broken)
    shutil.copytree(folder / "vae", broken / "vae")
    shard = next((broken / "transformer").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="safetensors: its header claims .* damaged or incomplete"):
        QwenImagePipeline.from_pretrained(broken)


def test_hub_id_without_network_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="could not get nobody/no-such-model .*connect to the internet.*"
                                              "the first run downloads about 58 GB .*--quantize quantizes them after"):
        QwenImagePipeline.from_pretrained("nobody/no-such-model")


def test_latents_as_mx_array(pipes):
    ours, _ = pipes
    noise = _noise(1, 32, 32)
    a = ours.generate("x", width=32, height=32, steps=1, latents=noise, output="np")
    b = ours.generate("x", width=32, height=32, steps=1, latents=mx.array(noise), output="np")
    np.testing.assert_array_equal(a, b)


def _packed(noise):
    """diffusers' (B, 1, C, h, w) noise in the packed (B, (h/2)(w/2), 4C) layout."""
    b, _, c, h, w = noise.shape
    return noise.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)


@pytest.mark.parametrize("strength, steps, cfg_scale", [(0.6, 5, 4.0), (1.0, 3, 1.0), (0.3, 4, 2.0)])
def test_img2img_equals_diffusers(pipes, monkeypatch, strength, steps, cfg_scale):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img as img2img
    from PIL import Image

    ours, reference = pipes
    # diffusers samples the image latent from the VAE's distribution; we use its mean (as the edit pipelines
    # do), so the reference is made to use the mean too.
    monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None, sample_mode="": out.latent_dist.mode())
    pixels = np.random.default_rng(4).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    width, height = 96, 64
    ref_pipe = img2img.QwenImageImg2ImgPipeline(**reference.components)
    with torch.no_grad():
        expected = ref_pipe(
            prompt="a watercolor version", image=image, strength=strength, width=width, height=height,
            negative_prompt=" " if cfg_scale > 1 else None, true_cfg_scale=cfg_scale, num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images
    noise = torch.randn((1, 1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(0)).numpy()
    got = ours.generate("a watercolor version", image=image, strength=strength, width=width, height=height,
                        steps=steps, cfg_scale=cfg_scale, latents=_packed(noise), output="np")
    assert rel_err(got[None] - 0.5, expected - 0.5) < 1e-3


def test_img2img_default_size_progress_and_bad_strength(pipes):
    from PIL import Image

    from mlx_qwen_image.conditioning import output_size

    ours, _ = pipes
    image = Image.new("RGB", (300, 200), (200, 30, 30))
    v = ours.variant
    assert output_size(v, None, None, image) == (1248, 832)  # the picture's aspect at ~1024x1024, sides / 32
    assert output_size(v, None, None) == (1024, 1024)
    # One side given: the other keeps the picture's aspect.
    assert output_size(v, 64, None, image) == (64, 48) and output_size(v, None, 64, image) == (96, 64)
    assert output_size(v, 64, None) == (64, 64)
    calls = []
    ours.generate("x", image=image, width=32, height=32, steps=4, strength=0.5, cfg_scale=1.0, output="np",
                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    with pytest.raises(ValueError, match="strength must be in"):
        ours.generate("x", image=image, strength=0, steps=2)
    with pytest.raises(ValueError, match="strength applies to img2img only"):
        ours.generate("x", strength=0.5, steps=2)


def test_low_memory_frees_the_timestep_weights_during_the_loop(pipes):
    ours, _ = pipes
    model = ours.transformer
    ours.low_memory = True
    try:
        run = ours.denoise("x", width=32, height=32, steps=3, cfg_scale=2.0, seed=1)
        first = next(run)
        mx.eval(first)
        assert model.modulation_weights_dropped  # img_mod/txt_mod/norm_out.linear gone while denoising
        *_, last = run
        assert not model.modulation_weights_dropped  # back (lazily) once the run ends
        run = ours.denoise("x", width=32, height=32, steps=3, cfg_scale=2.0, seed=1)
        next(run)
        run.close()  # stopping early restores them too
        assert not model.modulation_weights_dropped
    finally:
        ours.low_memory = False
    again = ours.generate("x", width=32, height=32, steps=3, cfg_scale=2.0, seed=1, output="np")
    np.testing.assert_array_equal(ours.decode(last, 32, 32, output="np")[0], again)


def test_two_threads_give_the_arrays_of_two_sequential_runs(pipes):
    import threading

    ours, _ = pipes
    requests = {"a": ("a lighthouse at dusk", 11), "b": ("两只猫在屋顶上", 12)}
    args = dict(width=48, height=32, steps=2, cfg_scale=2.0, output="np")
    sequential = {k: ours.generate(p, seed=s, **args) for k, (p, s) in requests.items()}
    ours.prompt_cache.clear()  # the threads encode their prompts themselves
    got, errors = {}, []

    def worker(key):
        try:
            prompt, seed = requests[key]
            got[key] = ours.generate(prompt, seed=seed, **args)
        except BaseException as e:  # reported below; a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for key in requests:
        np.testing.assert_array_equal(got[key], sequential[key])
    assert np.abs(got["a"] - got["b"]).max() > 1e-3


def test_step_hooks_see_every_step_and_can_change_the_latents(pipes):
    from mlx_qwen_image.conditioning import StepHook

    ours, _ = pipes

    class Recorder(StepHook):
        def __init__(self):
            self.predicted, self.after = [], []

        def predict(self, step, sigma, compute):
            self.predicted.append((step, sigma))
            return compute()

        def after_step(self, step, latents, sigma_next):
            self.after.append((step, sigma_next))
            return latents * 0 if step == 2 else latents  # as a blend that overwrites everything would

    hook = Recorder()
    run = ours.denoise("hooked", width=32, height=32, steps=3, cfg_scale=1.0, seed=3, hooks=[hook])
    latents = list(run)
    sigmas = run.schedule.sigmas
    assert hook.predicted == [(i, pytest.approx(float(sigmas[i]))) for i in range(3)]
    assert hook.after == [(i, pytest.approx(float(sigmas[i + 1]))) for i in range(3)]
    assert float(mx.abs(latents[1]).max()) > 0 and float(mx.abs(latents[2]).max()) == 0
    # A hook that does nothing changes nothing.
    plain = ours.generate("hooked", width=32, height=32, steps=3, cfg_scale=1.0, seed=3, output="np")
    again = ours.generate("hooked", width=32, height=32, steps=3, cfg_scale=1.0, seed=3, output="np",
                          hooks=[StepHook()])
    np.testing.assert_array_equal(plain, again)


def test_a_closed_run_frees_the_pipeline(pipes):
    ours, _ = pipes
    run = ours.denoise("x", width=32, height=32, steps=3, cfg_scale=1.0, seed=1)
    next(run)
    run.close()
    with pytest.raises(RuntimeError, match="closed after 1 of 3 steps"):
        run.complete("np")
    assert ours._lock.acquire(blocking=False)  # nobody holds it
    ours._lock.release()


def test_the_schedule_comes_from_the_scheduler_config(tiny_checkpoint):
    from mlx_qwen_image.scheduler import LIGHTNING_SCHEDULER_CONFIG, lightning_scheduler

    folder, _ = tiny_checkpoint
    lightning = QwenImagePipeline.from_pretrained(folder, dtype="float32", scheduler_config=LIGHTNING_SCHEDULER_CONFIG)
    run = lightning.denoise("x", width=64, height=32, steps=4, cfg_scale=1.0)
    np.testing.assert_array_equal(run.schedule.sigmas, lightning_scheduler().sigmas(4, 8))
    fixed = QwenImagePipeline.from_pretrained(folder, dtype="float32",
                                              scheduler_config={**LIGHTNING_SCHEDULER_CONFIG, "sigmas": [1.0, 0.5]})
    run = fixed.denoise("x", width=32, height=32, cfg_scale=1.0)  # a fixed grid sets the default step count
    assert run.total == 2 and run.schedule.sigmas.tolist() == [1.0, 0.5, 0.0]
    assert run.complete("np")[0].shape == (32, 32, 3)


def test_non_finite_latents_never_become_a_picture(pipes):
    from mlx_qwen_image.conditioning import StepHook
    from mlx_qwen_image.pipeline import NonFiniteError

    ours, _ = pipes

    class Poison(StepHook):
        def after_step(self, step, latents, sigma_next):
            return latents * float("nan")

    with pytest.raises(NonFiniteError, match="hold NaN or infinite values, so no picture was made"):
        ours.generate("x", width=32, height=32, steps=1, cfg_scale=1.0, hooks=[Poison()])
    with pytest.raises(NonFiniteError):
        ours.decode(np.full((1, 4, 16), np.inf, np.float32), 32, 32)
    run = ours.denoise("x", width=32, height=32, steps=1, cfg_scale=1.0, seed=2)
    latents = np.array(list(run)[-1])
    # numpy latents decode like mx ones
    np.testing.assert_array_equal(ours.decode(latents, 32, 32, output="np"), run.complete("np"))
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 16\); expected \(batch, 6, C\)"):
        ours.decode(latents, 32, 48)
