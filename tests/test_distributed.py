"""Several Macs as one, tried on one machine: two real ranks started by `mlx.launch --backend ring -n 2` over
loopback, each test bounded in time and its processes killed when it ends."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import rel_err

from mlx_qwen_image.benchmarks.bench import main as bench_main
from mlx_qwen_image import QwenImagePipeline
from mlx_qwen_image.cli import cli
from mlx_qwen_image.distributed import DistributedError, check_tensor, choose
from mlx_qwen_image.models.transformer import TransformerConfig

BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("distributed_worker.py")
CLI = str(BIN / "mlx-qwen-image")
GENERATE = ("generate", "a red fox in the snow", "--width", "64", "--height", "48", "--steps", "3",
            "--dtype", "float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*command, timeout=150):
    """Run ``command`` on 2 ranks; (exit code, stdout + stderr, seconds). The whole process group goes when the
    time is up, so a hang fails the test instead of stalling the suite."""
    args = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2", "--starting-port", str(free_port()), "--",
            *map(str, command)]
    return bounded(args, timeout)


def bounded(args, timeout, env=None):
    start = time.perf_counter()
    # stdin: an empty pipe kept open (at end of file, the loop in mlx.launch that forwards input spins)
    quiet, keep = os.pipe()
    proc = subprocess.Popen(args, stdin=quiet, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    os.close(quiet)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{args[0]} did not end within {timeout} s:\n{out}")
    finally:
        os.close(keep)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything a rank left behind
        except ProcessLookupError:
            pass
    return proc.returncode, out, time.perf_counter() - start


@pytest.fixture(scope="module")
def single(tiny_checkpoint):
    """The single-process run the parallel ones must equal: float32, fixed noise."""
    pipe = QwenImagePipeline.from_pretrained(tiny_checkpoint[0], dtype="float32")
    latents = np.random.default_rng(0).standard_normal((1, 12, 16)).astype(np.float32)
    run = pipe.denoise("a lamp on a desk", width=64, height=48, steps=3, cfg_scale=4.0, latents=latents)
    image = run.complete("np")[0]
    return image, np.array(run.latents), pipe.enhance_prompt("a lamp on a desk", max_tokens=6)[0]


def pipeline_on_two(mode, folder, tmp_path):
    out = tmp_path / f"{mode}.npz"
    code, log, _ = launch(sys.executable, WORKER, "pipeline", mode, folder, out)
    assert code == 0 and out.exists(), log
    return np.load(out)


def test_cfg_parallel_gives_the_single_process_image(tiny_checkpoint, single, tmp_path):
    got = pipeline_on_two("cfg", tiny_checkpoint[0], tmp_path)
    assert rel_err(got["latents"], single[1]) < 1e-5
    assert rel_err(got["image"], single[0]) < 1e-5


def test_tensor_parallel_equals_single_process_and_halves_what_ranks_hold(tiny_checkpoint, single, tmp_path):
    got = pipeline_on_two("tensor", tiny_checkpoint[0], tmp_path)
    assert rel_err(got["latents"], single[1]) < 1e-4
    assert rel_err(got["image"], single[0]) < 1e-4
    whole = QwenImagePipeline.from_pretrained(tiny_checkpoint[0], dtype="float32").transformer
    from distributed_worker import block_bytes

    full = block_bytes(whole)
    for resident in got["resident"]:  # the norms stay whole, so a little over half
        assert 0.45 * full < resident < 0.55 * full, (resident, full)
    assert list(got["encoders"]) == [1, 0]  # the text encoder lives on rank 0, which sends the features
    assert str(got["enhanced"]) == single[2]  # and rewrites the prompt for every rank


@pytest.mark.parametrize("bits", [0, 4])
def test_sharded_transformer_output_float_and_quantized(bits, tmp_path):
    out = tmp_path / f"model{bits}.npz"
    code, log, _ = launch(sys.executable, WORKER, "model", bits, out)
    assert code == 0 and out.exists(), log
    got = np.load(out)
    assert rel_err(got["split"], got["whole"]) < 1e-4
    for resident in got["resident"]:
        assert 0.45 * got["whole_bytes"] < resident < 0.55 * got["whole_bytes"]
    # The benchmark's traffic count: 4 all-reduces per block, of which the last block's two text ones are never
    # evaluated (nothing reads them), so its count leaves them out.
    from mlx_qwen_image.benchmarks.communication import step_traffic
    from distributed_worker import WIDE

    cfg = TransformerConfig(**{**WIDE, "axes_dims_rope": tuple(WIDE["axes_dims_rope"])})
    count = step_traffic("tensor", cfg, n_img=24, n_txt=7, dtype_bytes=4, rows=1)
    reduced = got["reduced"]
    assert len(reduced) == 4 * cfg.num_layers
    text_of_last = 2 * 7 * cfg.inner_dim * 4
    assert reduced.sum() - text_of_last == count["payload"] and count["collectives"] == len(reduced) - 2


def test_the_benchmark_splits_a_step_and_prints_every_mode_s_traffic(tmp_path):
    out = tmp_path / "tensor2"
    code, log, _ = launch(sys.executable, "-m", "mlx_qwen_image.benchmarks.bench", "--tiny", "--trials", "1",
                          "--no-text-encoder", "--no-vae", "--parallel", "tensor", "--out", out)
    assert code == 0 and out.with_suffix(".json").exists(), log
    result = json.loads(out.with_suffix(".json").read_text())
    alone = tmp_path / "alone"
    assert bench_main(["--tiny", "--trials", "1", "--no-text-encoder", "--no-vae", "--out", str(alone)]) == 0
    whole = json.loads(alone.with_suffix(".json").read_text())["weights"]["resident_bytes"]
    assert 0.45 * whole < result["weights"]["resident_bytes"] < 0.6 * whole  # rank 0's, beside the one process
    assert result["parallel"]["mode"] == "tensor" and result["parallel"]["ranks"] == 2
    assert [r["mode"] for r in result["parallel"]["traffic"]] == ["cfg", "tensor", "data"]
    cfg, tensor, data = result["parallel"]["traffic"]  # at 1024² (4096 image, 64 text tokens), CFG, bf16
    assert cfg["bytes"] == 4096 * 64 * 2  # the other rank's velocity
    assert tensor["bytes"] == 60 * 2 * (4096 + 64) * 3072 * 2 * 2 - 2 * 64 * 3072 * 2 * 2 and data["bytes"] == 0
    assert "| tensor | 6.13 GB | 238 |" in out.with_suffix(".md").read_text()


def test_data_parallel_cli_writes_the_single_process_files(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint[0])
    alone, together = tmp_path / "alone", tmp_path / "together"
    alone.mkdir(), together.mkdir()
    code, log, _ = bounded([CLI, *GENERATE, "--model", model, "--seed", "5", "--num-images", "3",
                            "-o", alone / "fox.png"], 120)
    assert code == 0, log
    code, log, _ = launch(CLI, *GENERATE, "--model", model, "--seed", "5", "--num-images", "3",
                          "-o", together / "fox.png")
    assert code == 0, log
    assert "2 ranks, --parallel data" in log  # the default for several images, stated
    assert log.count("done: 3 image(s) on 2 ranks (--parallel data)") == 1  # rank 0 alone reports
    names = sorted(p.name for p in alone.iterdir())
    assert names == ["fox-1.png", "fox-2.png", "fox-3.png"] == sorted(p.name for p in together.iterdir())
    for name in names:
        assert (alone / name).read_bytes() == (together / name).read_bytes(), name


def test_cfg_parallel_cli_writes_one_image_from_rank_0(tiny_checkpoint, tmp_path):
    code, log, _ = launch(CLI, *GENERATE, "--model", tiny_checkpoint[0], "--seed", "9", "--parallel", "cfg",
                          "-o", tmp_path / "fox.png")
    assert code == 0, log
    assert [p.name for p in tmp_path.iterdir()] == ["fox.png"]
    assert log.count("saved ") == 1 and log.count("seed 9: encoding the prompt") == 1


def test_an_error_on_one_rank_stops_both_with_its_message(tiny_checkpoint, tmp_path):
    out = tmp_path / "fox.png"
    script = (f'if [ "$MLX_RANK" = 1 ]; then M={tmp_path / "missing"}; else M={tiny_checkpoint[0]}; fi; '
              f'exec {CLI} {shlex.join(GENERATE)} --steps 2000 --parallel cfg --model "$M" -o {out}')
    code, log, seconds = launch("bash", "-c", script)
    assert f"Error: rank 1: model folder {tmp_path / 'missing'} does not exist" in log
    assert not out.exists() and seconds < 60, log


def test_a_killed_rank_ends_the_run(tiny_checkpoint, tmp_path):
    out = tmp_path / "fox.png"
    script = (f'if [ "$MLX_RANK" = 1 ]; then (sleep 5; kill -9 $$) & fi; '
              f'exec {CLI} {shlex.join(GENERATE)} --steps 20000 --parallel cfg --model {tiny_checkpoint[0]} -o {out}')
    code, log, seconds = launch("bash", "-c", script)
    assert "rank 1 exited with code -9" in log  # mlx.launch's line; rank 0 is then stopped, not left waiting
    assert not out.exists() and seconds < 60, log


def test_an_unreachable_rank_stops_within_the_timeout(tiny_checkpoint, tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    code, log, seconds = bounded([CLI, *GENERATE, "--model", str(tiny_checkpoint[0]), "--connect-timeout", "2",
                                  "-o", str(tmp_path / "fox.png")], 60,
                                 env={"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts)})
    assert code != 0 and seconds < 20, log
    assert "Error: rank 0 could not reach the other ranks within 2 s: check the host list" in log
    assert "Traceback" not in log and not (tmp_path / "fox.png").exists()


def test_parallel_needs_mlx_launch_and_serve_refuses_it(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(cli, [*GENERATE, "--model", str(tiny_checkpoint[0]), "--parallel", "tensor",
                                      "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 1 and "--parallel tensor: run under mlx.launch" in result.output
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_checkpoint[0])], env={"MLX_RANK": "0"})
    assert result.exit_code == 1 and "serve runs on one Mac: start it without mlx.launch" in result.output
    with pytest.raises(ValueError, match="needs a group of ranks"):
        QwenImagePipeline.from_pretrained(tiny_checkpoint[0], parallel="cfg")


class Ranks:
    """The group's size is all `choose` and `check_tensor` look at."""

    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


def test_choose_picks_the_fastest_that_fits_and_refuses_what_cannot_work():
    assert choose(None, Ranks(2), cfg=True, images=4, fits_one=True) == "data"
    assert choose(None, Ranks(2), cfg=True, images=1, fits_one=True) == "cfg"
    assert choose(None, Ranks(2), cfg=False, images=1, fits_one=True) == "tensor"
    assert choose(None, Ranks(2), cfg=True, images=4, fits_one=False) == "tensor"  # only shards fit
    assert choose(None, Ranks(4), cfg=True, images=1, fits_one=True) == "tensor"
    assert choose("tensor", Ranks(2), cfg=True, images=4, fits_one=True) == "tensor"
    # a model whose blocks cannot be sharded (Qwen-Image 2.1): images or CFG branches only
    assert choose(None, Ranks(2), cfg=True, images=1, fits_one=True, tensor=False) == "cfg"
    assert choose(None, Ranks(2), cfg=False, images=2, fits_one=True, tensor=False) == "data"
    for args in (dict(cfg=False, images=1, fits_one=True), dict(cfg=True, images=4, fits_one=False)):
        with pytest.raises(DistributedError, match="Qwen-Image 2.1 .*tensor"):
            choose(None, Ranks(2), tensor=False, name="Qwen-Image 2.1", **args)
    with pytest.raises(DistributedError, match="--parallel tensor is not available for Qwen-Image 2.1; use"):
        choose("tensor", Ranks(2), cfg=True, images=1, fits_one=True, tensor=False, name="Qwen-Image 2.1")
    with pytest.raises(DistributedError, match="needs exactly 2 ranks and CFG on"):
        choose("cfg", Ranks(2), cfg=False, images=1, fits_one=True)
    with pytest.raises(DistributedError, match="needs exactly 2 ranks"):
        choose("cfg", Ranks(3), cfg=True, images=1, fits_one=True)


def test_tensor_refuses_heads_that_do_not_split():
    config = TransformerConfig(num_attention_heads=3, attention_head_dim=8)
    with pytest.raises(DistributedError, match="3 attention heads and 96 MLP units do not split evenly over 2"):
        check_tensor(config, 2)
    check_tensor(config, 3)


def test_qwen21_splits_cfg_branches_and_refuses_tensor(tiny21_checkpoint, tmp_path):
    model = str(tiny21_checkpoint[0])
    args = ("generate", "a paper boat", "--model", model, "--width", "64", "--height", "64", "--steps", "2",
            "--dtype", "float32", "--seed", "3", "--cfg-scale", "3")
    code, log, _ = bounded([CLI, *args, "-o", tmp_path / "alone.png"], 120)
    assert code == 0, log
    code, log, _ = launch(CLI, *args, "--parallel", "cfg", "-o", tmp_path / "split.png")
    assert code == 0 and "2 ranks, --parallel cfg" in log, log
    assert (tmp_path / "alone.png").read_bytes() == (tmp_path / "split.png").read_bytes()
    code, log, _ = launch(CLI, *args, "--parallel", "tensor", "-o", tmp_path / "tensor.png")
    assert "--parallel tensor is not available for Qwen-Image 2.1" in log and "Traceback" not in log, log
    assert not (tmp_path / "tensor.png").exists()
