"""The benchmark at a CI size (so it cannot rot), its FLOP formula against the model, and the published figures."""

import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_qwen_image.benchmarks.bench import main
from mlx_qwen_image.benchmarks.flops import transformer_step_flops
from mlx_qwen_image.benchmarks.report import load_references, reference_rows
from mlx_qwen_image.cli import cli
from mlx_qwen_image.config import TransformerConfig
from mlx_qwen_image.models.transformer import QwenImageTransformer

ROOT = Path(__file__).resolve().parents[1]

PHASES = ("text_encoder", "modulation_table", "step_cfg", "step_nocfg", "vae_decode")


def _check(result: dict, headline: str = "step_cfg"):
    assert result["device"]["type"] in ("cpu", "gpu")
    assert result["config"]["tiny"] and result["config"]["blocks"] == 1
    assert set(PHASES) <= set(result["phases"])
    for name in PHASES:
        phase = result["phases"][name]
        assert phase["seconds"] > 0 and phase["peak_memory"] > 0, name
    assert result["matmul"]["flops_per_s"] > 0
    cfg, nocfg = result["phases"]["step_cfg"], result["phases"]["step_nocfg"]
    assert cfg["flops"]["total"] > 1.9 * nocfg["flops"]["total"]
    assert len(cfg["trials"]) == result["config"]["trials"]
    # Sane: positive and finite; above 100% only by timer noise, never by orders of magnitude.
    assert math.isfinite(result["efficiency"]) and 0 < result["efficiency"] < 5
    assert result["efficiency"] == result["phases"][headline]["efficiency"]
    assert result["weights"]["modulation_weights_dropped"]


def test_tiny_benchmark_writes_json_and_markdown(tmp_path):
    out = tmp_path / "tiny"
    assert main(["--tiny", "--trials", "2", "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    _check(result)
    assert result["projection"] is None and result["references"] == []  # not full width: nothing projected
    text = out.with_suffix(".md").read_text()
    assert "| transformer step, CFG (batch 2) |" in text and "Tiny CI components" in text


def test_benchmark_command(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["benchmark", "--tiny", "--trials", "1", "--no-text-encoder", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.with_suffix(".json").read_text())
    assert "text_encoder" not in data["phases"] and data["efficiency"] > 0
    assert "| phase |" in result.output


def test_efficiency_check_fails_below_the_bar(tmp_path):
    out = tmp_path / "bar"
    assert main(["--tiny", "--trials", "1", "--no-text-encoder", "--no-vae", "--out", str(out),
                 "--check-efficiency", "100"]) == 1


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_flop_formula_counts_every_linear_layer(zero_cond_t):
    """The formula against the matmuls of the model's own linear layers, layer by layer."""
    cfg = TransformerConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                            joint_attention_dim=40, in_channels=16, out_channels=4)
    model = QwenImageTransformer(cfg)
    batch, n_img, n_txt = 2, 12, 7
    counted = 0
    for path, layer in model.named_modules():
        if not hasattr(layer, "weight") or layer.weight.ndim != 2:  # linear layers only (norms are 1-D)
            continue
        if path.startswith(f"transformer_blocks.{cfg.num_layers - 1}.") and ("to_add_out" in path or "txt_mlp" in path):
            continue  # the last block's text outputs are unused, so never computed
        rows = n_txt if ("add_" in path or "txt_" in path or path == "txt_in") else n_img
        if path.endswith("_mod.1") or path.startswith(("time_text_embed", "norm_out")):
            rows = 1  # one modulation row per item
        counted += 2 * rows * layer.weight.shape[0] * layer.weight.shape[1]
    attention = cfg.num_layers * 4 * (n_img + n_txt) ** 2 * cfg.inner_dim
    assert transformer_step_flops(cfg, batch, n_img, n_txt)["total"] == batch * (counted + attention)


def test_full_size_counts_match_the_issue():
    # One 1024x1024 step with CFG is ~140 TFLOP (1328x1328: ~260), attention ~20-27% of it.
    for side, total, share in ((1024, 138.6e12, 0.184), (1328, 260.3e12, 0.274)):
        f = transformer_step_flops(TransformerConfig(), 2, (side // 16) ** 2, 64)
        assert f["total"] == pytest.approx(total, rel=1e-3)
        assert f["attention"] / f["total"] == pytest.approx(share, abs=1e-3)


def test_published_figures_and_their_page_agree():
    refs = load_references()["entries"]
    page = (ROOT / "benchmarks" / "cuda_reference.md").read_text()
    for e in refs:
        assert e["name"] in page and e["source"].split(" (")[0] in page, e["name"]
    rows = reference_rows({"phases": {"step_cfg": {"flops_per_s": 10e12}}})
    assert len(rows) == len(refs)
    mflux = next(r for r in rows if r["name"].startswith("mflux"))
    # 1024x1024 without CFG: 69.3 TFLOP per step in 11.9 s; at 10 TFLOPS this machine needs 6.9 s.
    assert mflux["implied_flops_per_s"][0] == pytest.approx(69.3e12 / 11.9, rel=2e-3)
    assert mflux["ours_seconds_per_step"] == [pytest.approx(6.93, rel=2e-3)]


def test_benchmark_command_from_an_installed_wheel(tmp_path):
    """`mlx-qwen-image benchmark` from a wheel installed away from the source checkout (no benchmarks/ folder)."""
    import os
    import subprocess

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("mlx_qwen_image-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import sys, mlx_qwen_image; print(mlx_qwen_image.__file__); "
            "from mlx_qwen_image.cli import main; sys.argv = ['mlx-qwen-image'] + sys.argv[1:]; main()")
    done = subprocess.run([sys.executable, "-c", code, "benchmark", "--tiny", "--trials", "1", "--no-vae"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(str(site))  # the wheel's copy ran, not the checkout's
    (result,) = (work / "benchmark-results").glob("*.json")
    assert json.loads(result.read_text())["phases"]["step_cfg"]["seconds"] > 0


def test_the_benchmark_times_a_step_cache_beside_no_cache(tmp_path):
    out = tmp_path / "cache"
    assert main(["--tiny", "--trials", "1", "--no-text-encoder", "--no-vae", "--steps", "12", "--cache",
                 "taylorseer:5", "--out", str(out)]) == 0
    cache = json.loads(out.with_suffix(".json").read_text())["phases"]["cache"]
    assert cache["setting"] == "taylorseer:5" and cache["passes"] == 24 and cache["computed"] < 24
    assert cache["seconds_with"] > 0 and cache["seconds_without"] > 0
    assert "Step cache taylorseer:5" in out.with_suffix(".md").read_text()


def test_qwen21_benchmark_writes_json_and_markdown(tmp_path):
    out = tmp_path / "tiny21"
    assert main(["--model", "2.1", "--tiny", "--trials", "2", "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    _check(result, headline="step_nocfg")  # 2.1 runs without CFG by default
    assert result["model"] == "qwen-image-2.1" and result["projection"] is None
    for name in ("step_cfg", "step_nocfg"):  # the first step also runs the text through every block
        phase = result["phases"][name]
        assert phase["first_step_flops"]["total"] > phase["flops"]["total"] and phase["first_step_seconds"] > 0
    sizes = [(r["width"], r["height"]) for r in result["flop_table"]]
    assert sizes == [(1024, 1024), (2048, 2048)]
    text = out.with_suffix(".md").read_text()
    assert "# Qwen-Image 2.1 benchmark" in text and "| 2048x2048 |" in text


def test_qwen21_benchmark_refuses_sizes_not_multiples_of_32(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "2.1", "--tiny", "--width", "48"])
    assert e.value.code == 2 and "multiples of 32" in capsys.readouterr().err


@pytest.mark.parametrize("cached", [True, False])
def test_qwen21_flop_formula_counts_every_linear_layer(cached):
    from mlx_qwen_image.benchmarks.flops import transformer21_step_flops
    from mlx_qwen_image.models.transformer21 import QwenImage21Transformer, Transformer21Config

    cfg = Transformer21Config(num_layers=2, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                              context_in_dim=40)
    model = QwenImage21Transformer(cfg)
    batch, n_img, n_txt = 2, 12, 7
    counted = 0
    for path, layer in model.named_modules():
        if not hasattr(layer, "weight") or layer.weight.ndim != 2:
            continue
        if path.startswith("txt_in."):
            rows = 0 if cached else n_txt  # the text runs once, at the first step, into the prefix cache
        elif path.startswith(("modulation", "time_text_embed", "norm_out")):
            rows = 1  # one modulation row per item
        elif path.startswith("transformer_blocks."):
            rows = n_img if cached else n_img + n_txt
        else:
            rows = n_img  # img_in, proj_out
        counted += 2 * rows * layer.weight.shape[0] * layer.weight.shape[1]
    # Target queries see every key; causal text queries (first step) see the text up to themselves.
    pairs = n_img * (n_img + n_txt) + (0 if cached else n_txt * (n_txt + 1) // 2)
    attention = cfg.num_layers * 4 * cfg.inner_dim * pairs
    assert transformer21_step_flops(cfg, batch, n_img, n_txt, cached)["total"] == batch * (counted + attention)
