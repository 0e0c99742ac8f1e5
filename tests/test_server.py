"""`serve`: the real server (uvicorn on a free loopback port) with tiny checkpoints, used through real clients: the
`openai` package, plain HTTP for the A1111 routes, and the web page in a real headless Chromium."""

import base64
import concurrent.futures
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_qwen_image.cli import cli
from mlx_qwen_image.jobs import Service
from mlx_qwen_image.server import create_app

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SMALL = dict(width=32, height=32, steps=2, cfg_scale=2.0)


class Running:
    """A real uvicorn server in a thread, on a free loopback port."""

    def __init__(self, service: Service):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.service = service
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if self.service.pipe is not None:
                return self
            time.sleep(0.1)
        raise TimeoutError(self.service.load_error)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.service.stop()


def http(method, url, body=None, headers=None, raw=False):
    """(status, JSON or bytes) of a plain HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            payload = response.read()
            return response.status, payload if raw else json.loads(payload)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = Running(Service(str(tiny_checkpoint[0]), {"dtype": "float32"}, queue_size=16)).ready()
    yield running
    running.stop()


def client(server, key="unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_openai_client_gives_the_cli_image(server, tiny_checkpoint, tmp_path):
    response = client(server).images.generate(
        model="qwen-image", prompt="a shop sign that says OPEN", size="48x32", response_format="b64_json",
        extra_body={"seed": 11, "steps": 2, "cfg_scale": 3.0, "negative_prompt": "blurry"})
    assert response.created > 0 and len(response.data) == 1 and response.data[0].revised_prompt is None
    served = _pixels(base64.b64decode(response.data[0].b64_json))
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(cli, ["generate", "a shop sign that says OPEN", "--model", str(tiny_checkpoint[0]),
                                      "--width", "48", "--height", "32", "--steps", "2", "--dtype", "float32",
                                      "--cfg-scale", "3", "--negative-prompt", "blurry", "--seed", "11",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(served, np.asarray(Image.open(out)))


def test_n_images_urls_formats_and_the_job(server):
    response = client(server).images.generate(prompt="two lamps", n=2, size="32x32", response_format="url",
                                              output_format="webp", extra_body={"seed": 5, "steps": 2})
    images = []
    for item in response.data:
        status, data = http("GET", item.url, raw=True)
        assert status == 200
        images.append(Image.open(io.BytesIO(data)))
    assert [i.format for i in images] == ["WEBP", "WEBP"] and images[0].size == (32, 32)
    job = item.url.split("/v1/images/")[1].split("/")[0]
    status, state = http("GET", f"{server.url}/v1/jobs/{job}")
    assert status == 200 and state["status"] == "succeeded" and state["images"] == 2 and state["total"] == 2
    # n images are the seeds seed, seed + 1: the second one is the single image of seed 6.
    single = client(server).images.generate(prompt="two lamps", size="32x32", output_format="webp",
                                            response_format="url", extra_body={"seed": 6, "steps": 2})
    np.testing.assert_array_equal(np.asarray(images[1]), _pixels(http("GET", single.data[0].url, raw=True)[1]))


def test_edits_on_a_text_to_image_checkpoint_are_img2img(server, tmp_path):
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(picture)
    with open(picture, "rb") as f:
        response = client(server).images.edit(image=f, prompt="watercolor", size="64x48",
                                              extra_body={"seed": 3, "steps": 4, "strength": 0.5})
    served = _pixels(base64.b64decode(response.data[0].b64_json))
    expected = server.service.pipe.generate("watercolor", image=str(picture), strength=0.5, width=64, height=48,
                                            steps=4, seed=3)
    np.testing.assert_array_equal(served, np.asarray(expected))


def test_edits_with_a_mask_inpaint_where_the_mask_is_transparent(server, tmp_path):
    picture, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(picture)
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[8:30, 10:40] = 0  # OpenAI's convention: transparent = edit here
    Image.fromarray(np.dstack([np.zeros((48, 64, 3), np.uint8), alpha]), "RGBA").save(mask)
    with open(picture, "rb") as f, open(mask, "rb") as m:
        response = client(server).images.edit(image=f, mask=m, prompt="a door", size="64x48",
                                              extra_body={"seed": 3, "steps": 3, "strength": 1.0})
    served = _pixels(base64.b64decode(response.data[0].b64_json))
    white = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))  # the same region, as a white mask
    expected = server.service.pipe.generate("a door", image=str(picture), mask=white, strength=1.0, width=64,
                                            height=48, steps=3, seed=3)
    np.testing.assert_array_equal(served, np.asarray(expected))
    unmasked = server.service.pipe.generate("a door", image=str(picture), strength=1.0, width=64, height=48,
                                            steps=3, seed=3)
    assert not np.array_equal(served, np.asarray(unmasked))
    # A1111 img2img: a white-on-black mask, blurred by mask_blur
    encoded = base64.b64encode(picture.read_bytes()).decode()
    white.save(tmp_path / "white.png")
    status, body = http("POST", f"{server.url}/sdapi/v1/img2img",
                        {"prompt": "a door", "init_images": [encoded], "seed": 3, "steps": 3, "width": 64,
                         "height": 48, "denoising_strength": 1.0, "mask_blur": 2,
                         "mask": base64.b64encode((tmp_path / "white.png").read_bytes()).decode()})
    assert status == 200, body
    expected = server.service.pipe.generate("a door", image=str(picture), mask=white, mask_blur=2, strength=1.0,
                                            width=64, height=48, steps=3, seed=3)
    np.testing.assert_array_equal(_pixels(base64.b64decode(body["images"][0])), np.asarray(expected))


def test_a1111_routes(server):
    status, body = http("POST", f"{server.url}/sdapi/v1/txt2img",
                        {"prompt": "a red kite", "seed": 9, "steps": 2, "cfg_scale": 2, "width": 32, "height": 32,
                         "batch_size": 1})
    assert status == 200 and set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert info["seed"] == 9 and info["all_seeds"] == [9]
    expected = server.service.pipe.generate("a red kite", seed=9, **SMALL)
    np.testing.assert_array_equal(_pixels(base64.b64decode(body["images"][0])), np.asarray(expected))
    init = base64.b64encode(base64.b64decode(body["images"][0])).decode()
    status, body = http("POST", f"{server.url}/sdapi/v1/img2img",
                        {"prompt": "a blue kite", "init_images": [f"data:image/png;base64,{init}"], "seed": 1,
                         "steps": 4, "denoising_strength": 0.5, "width": 32, "height": 32})
    assert status == 200 and len(body["images"]) == 1
    assert http("GET", f"{server.url}/sdapi/v1/options")[1]["sd_model_checkpoint"] == server.service.model
    assert http("GET", f"{server.url}/sdapi/v1/sd-models")[1][0]["title"] == server.service.model


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": ""}, "prompt", "prompt is required"),
    ({"prompt": "x", "size": "100x100"}, None, "width 100 is not a multiple of 16"),
    ({"prompt": "x", "size": "big"}, "size", "size must be WIDTHxHEIGHT"),
    ({"prompt": "x", "steps": 0}, "steps", "steps must be in [1, 1000]"),
    ({"prompt": "x", "steps": "many"}, "steps", "steps must be an integer"),
    ({"prompt": "x", "cfg_scale": "NaN"}, "cfg_scale", "cfg_scale must be a finite number"),
    ({"prompt": "x", "n": 11}, "n", "n must be in [1, 10]"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "output_format must be one of"),
    ({"prompt": "x", "response_format": "file"}, "response_format", "response_format must be b64_json or url"),
    ({"prompt": "x", "stream": "yes"}, "stream", "stream must be true or false"),
    ({"prompt": "x", "size": "100000x100000"}, None, "for the run's activations alone"),
])
def test_bad_requests_get_400_in_openais_shape(server, body, param, message):
    status, reply = http("POST", f"{server.url}/v1/images/generations", body)
    assert status == 400 and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert message in reply["error"]["message"]


def test_bad_bodies_and_uploads(server, tmp_path):
    status, reply = http("POST", f"{server.url}/v1/images/generations", b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = http("POST", f"{server.url}/sdapi/v1/img2img", {"prompt": "x", "init_images": ["@@@"]})
    assert status == 400 and "not base64" in reply["error"]["message"]
    from openai import BadRequestError

    (tmp_path / "notes.txt").write_text("not a picture")
    with open(tmp_path / "notes.txt", "rb") as f, pytest.raises(BadRequestError, match="not a usable image"):
        client(server).images.edit(image=f, prompt="x")


def test_eight_concurrent_requests_none_lost_none_swapped(server):
    seeds = list(range(100, 108))
    expected = {s: np.asarray(server.service.pipe.generate(f"lamp {s}", seed=s, **SMALL)) for s in seeds}

    def ask(seed):
        response = client(server).images.generate(prompt=f"lamp {seed}", size="32x32",
                                                  extra_body={"seed": seed, "steps": 2, "cfg_scale": 2.0})
        return seed, _pixels(base64.b64decode(response.data[0].b64_json))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(ask, seeds))
    assert sorted(results) == seeds
    for seed in seeds:
        np.testing.assert_array_equal(results[seed], expected[seed])


def test_streaming_progress_then_the_image(server):
    request = urllib.request.Request(f"{server.url}/v1/images/generations", method="POST",
                                     data=json.dumps({"prompt": "x", "stream": True, "seed": 2, **{
                                         "size": "32x32", "steps": 3}}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [(e.split("\n")[0][len("event: "):], json.loads(e.split("\n")[1][len("data: "):]))
              for e in text.strip().split("\n\n")]
    steps = [d["step"] for kind, d in events if kind == "image_generation.progress"]
    assert steps == [1, 2, 3]
    kind, last = events[-1]
    assert kind == "image_generation.completed" and last["seed"] == 2 and base64.b64decode(last["b64_json"])


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint):
    """A server with an API key, a queue of one, and a model that takes a moment to load."""
    import mlx_qwen_image.pipeline as pipeline

    slow = threading.Event()
    real = pipeline.QwenImagePipeline.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        slow.wait(30)
        return real(cls, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline.QwenImagePipeline, "from_pretrained", classmethod(from_pretrained))
        running = Running(Service(str(tiny_checkpoint[0]), {"dtype": "float32"}, queue_size=1, api_key="secret"))
        running.release = slow
        yield running
    running.stop()


def test_key_loading_queue_full_and_a_disconnect_cancels(guarded):
    key = {"Authorization": "Bearer secret"}
    status, reply = http("POST", f"{guarded.url}/v1/images/generations", {"prompt": "x"})
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    status, reply = http("POST", f"{guarded.url}/v1/images/generations", {"prompt": "x"}, key)
    assert status == 503 and reply["error"]["code"] == "model_loading"
    guarded.release.set()
    guarded.ready()
    # A long job fills the queue of one; the next request gets 429; dropping the first one's connection cancels it.
    conn = socket.create_connection(("127.0.0.1", guarded.port))
    body = json.dumps({"prompt": "long", "size": "64x64", "steps": 1000, "seed": 1}).encode()
    conn.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"
                 b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    job = None
    for _ in range(400):
        job = next((j for j in guarded.service.jobs.values() if j.status == "running"), None)
        if job is not None and job.step > 0:
            break
        time.sleep(0.05)
    assert job is not None and job.step > 0
    status, reply = http("POST", f"{guarded.url}/v1/images/generations", {"prompt": "x", "size": "32x32"}, key)
    assert status == 429 and reply["error"]["type"] == "rate_limit_error"
    conn.close()
    job.done.wait(60)
    assert job.status == "cancelled" and job.step < 1000
    status, state = http("GET", f"{guarded.url}/v1/jobs/{job.id}", headers=key)
    assert state["status"] == "cancelled"
    status, reply = http("POST", f"{guarded.url}/v1/images/generations", {"prompt": "x", "size": "32x32",
                                                                         "steps": 1}, key)
    assert status == 200  # the queue is free again


def _chromium() -> str:
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"):
        if Path(path).exists():
            return path
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # macOS: the browser `python -m playwright install chromium` fetched
        return p.chromium.executable_path


def test_the_web_page_in_a_real_browser(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('QwenImagePipeline')")
        page.fill("#prompt", "a lighthouse at dusk")
        page.select_option("#size", "64x64")
        page.fill("#steps", "12")
        page.fill("#seed", "4")
        page.click("#go")
        page.wait_for_function("document.getElementById('progress').value > 0", timeout=120_000)
        moving = page.eval_on_selector("#progress", "p => [p.value, p.max]")
        page.wait_for_selector("#image:not(.hidden)", timeout=120_000)
        assert 0 < moving[0] <= moving[1] == 12
        assert "seed: 4" in page.text_content("#params") and page.locator("#thumbs figure").count() == 1
        src = page.get_attribute("#image", "src")
        page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
        browser.close()
    expected = server.service.pipe.generate("a lighthouse at dusk", width=64, height=64, steps=12, seed=4)
    np.testing.assert_array_equal(_pixels(base64.b64decode(src.split(",", 1)[1])), np.asarray(expected))


def test_the_web_page_inpaints_with_a_mask(server, tmp_path):
    from playwright.sync_api import sync_playwright

    picture, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(picture)
    region = np.zeros((64, 64), np.uint8)
    region[10:40, 20:50] = 255
    Image.fromarray(region).save(mask)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('QwenImagePipeline')")
        page.fill("#prompt", "a red door")
        page.select_option("#size", "64x64")
        page.fill("#steps", "3")
        page.fill("#seed", "7")
        page.set_input_files("#pictures", str(picture))
        page.set_input_files("#mask", str(mask))
        page.click("#go")
        page.wait_for_selector("#image:not(.hidden)", timeout=120_000)
        src = page.get_attribute("#image", "src")
        browser.close()
    expected = server.service.pipe.generate("a red door", image=str(picture), mask=str(mask), width=64, height=64,
                                            steps=3, seed=7)
    np.testing.assert_array_equal(_pixels(base64.b64decode(src.split(",", 1)[1])), np.asarray(expected))


def test_the_serve_command_refuses_bad_options(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--queue", "0"])
    assert result.exit_code == 1 and "--queue 0: at least 1" in result.output
    result = CliRunner().invoke(cli, ["serve", "--gguf", str(tmp_path / "none.gguf")])
    assert result.exit_code == 1 and "no such file" in result.output
    result = CliRunner().invoke(cli, ["serve", "--controlnet", str(tmp_path / "none")])
    assert result.exit_code == 1 and "--controlnet" in result.output and "no such folder" in result.output


def test_the_serve_command_serves(tiny_checkpoint):
    """`mlx-qwen-image serve` as a real process: it prints the URL, loads, answers, and stops on SIGINT."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_qwen_image.cli", "serve", "--model", str(tiny_checkpoint[0]),
                             "--port", str(port), "--dtype", "float32"], stderr=subprocess.PIPE, text=True)
    try:
        assert f"at http://127.0.0.1:{port}/" in proc.stderr.readline()
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if http("GET", f"{url}/v1/models")[1]["data"][0]["ready"]:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        status, body = http("POST", f"{url}/v1/images/generations", {"prompt": "x", "size": "32x32", "steps": 1})
        assert status == 200 and Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (32, 32)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130)
