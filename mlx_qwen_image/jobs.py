"""The server's jobs: one resident pipeline, a bounded queue and the one worker that runs it (`server` is the HTTP
side).

The model loads once, in the background (requests get 503 until it is ready). Requests become jobs in a bounded
queue (429 when it is full) that one worker runs in order on the resident pipeline, since a Mac's GPU has one queue;
a job's ``n`` images use seeds ``seed``, ``seed + 1`` ... and each is exactly the image ``generate`` makes for that
seed. A cancelled job stops after its current step. Errors have OpenAI's shape: ``{"error": {"message", "type",
"param", "code"}}``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import queue
import random
import threading
import time
import uuid

from PIL import Image

MAX_UPLOAD_BYTES = 50 * 2**20
MAX_IMAGES_PER_REQUEST = 10
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
HISTORY = 200  # finished jobs kept for /v1/jobs and image URLs


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Cancelled(Exception):
    """The job was cancelled (its client went away); it stops after the current step."""


@dataclasses.dataclass
class Job:
    args: dict  # QwenImagePipeline.denoise arguments, without the seed
    seed: int
    n: int
    output_format: str
    metadata: dict
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:16])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    status: str = "queued"  # queued, running, succeeded, failed, cancelled
    image: int = 0  # the image being made (0-based)
    step: int = 0
    total: int = 0
    images: list = dataclasses.field(default_factory=list)  # encoded bytes, one per image
    progress: list = dataclasses.field(default_factory=list)  # (image, step, total) after every step, for streams
    error: ApiError | None = None
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def state(self) -> dict:
        out = {"id": self.id, "object": "image.job", "created": self.created, "status": self.status,
               "image": self.image, "images": self.n, "step": self.step, "total": self.total}
        if self.error is not None:
            out["error"] = self.error.body()["error"]
        if self.started_at is not None:
            out["queue_seconds"] = self.started_at - self.queued_at
        if self.finished_at is not None:
            out["seconds"] = self.finished_at - (self.started_at or self.queued_at)
        return out


class Service:
    """The resident pipeline, the bounded queue and its one worker thread."""

    def __init__(self, model: str, load: dict, queue_size: int = 16, api_key: str | None = None,
                 low_memory: bool = False, pipeline=None):
        self.model, self.load_args, self.api_key, self.low_memory = model, load, api_key, low_memory
        self.queue_size = queue_size
        self.pipe = pipeline
        self.load_error: str | None = None
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # queued and running jobs
        self._stop = threading.Event()
        if self.pipe is None:
            threading.Thread(target=self._load, name="load", daemon=True).start()
        threading.Thread(target=self._work, name="images", daemon=True).start()

    # -- the model -----------------------------------------------------------------------------------------

    def _load(self):
        from .pipeline import QwenImagePipeline

        try:
            self.pipe = QwenImagePipeline.from_pretrained(self.model, low_memory=self.low_memory, **self.load_args)
        except Exception as e:  # reported to every request instead of a dead server
            self.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__

    def ready(self):
        if self.load_error is not None:
            raise ApiError(503, f"the model could not be loaded: {self.load_error}", kind="server_error",
                           code="model_not_loaded")
        if self.pipe is None:
            raise ApiError(503, "the model is still loading; try again in a moment", kind="server_error",
                           code="model_loading")
        return self.pipe

    # -- jobs ----------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._pending >= self.queue_size:
                raise ApiError(429, f"the queue is full ({self.queue_size} jobs); try again later",
                               kind="rate_limit_error", code="queue_full")
            self._pending += 1
            self.jobs[job.id] = job
            for old in list(self.jobs)[:-HISTORY]:
                if self.jobs[old].done.is_set():
                    del self.jobs[old]
        self._queue.put(job)
        return job

    def cancel(self, job: Job):
        if job.status in ("queued", "running"):
            job.status = "cancelling" if job.status == "running" else "cancelled"
            if job.status == "cancelled":
                self._finish(job)

    def _finish(self, job: Job):
        if not job.done.is_set():
            job.finished_at = time.perf_counter()
            with self._lock:
                self._pending -= 1
            job.done.set()

    def _work(self):
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None or job.done.is_set():
                continue
            job.status, job.started_at = "running", time.perf_counter()
            try:
                self._run(job)
                job.status = "succeeded"
            except Cancelled:
                job.status = "cancelled"
            except ApiError as e:
                job.status, job.error = "failed", e
            except Exception as e:  # a run that failed (NaNs, memory): the job says why, the server lives on
                job.status, job.error = "failed", ApiError(500, str(e).splitlines()[0] if str(e) else type(e).__name__,
                                                           kind="server_error", code="generation_failed")
            self._finish(job)

    def _run(self, job: Job):
        pipe = self.ready()
        for i in range(job.n):
            if job.status == "cancelling":
                raise Cancelled
            job.image, job.step = i, 0
            run = pipe.denoise(**job.args, seed=job.seed + i)
            job.total = run.total

            def progress(done, total):
                job.step = done
                job.progress.append((job.image, done, total))
                if job.status == "cancelling":
                    raise Cancelled

            try:
                picture = run.complete("pil", progress)[0]
            finally:
                run.close()
            job.images.append(encode(picture, job.output_format, {**job.metadata, "seed": job.seed + i}))

    def stop(self):
        self._stop.set()
        self._queue.put(None)


def encode(picture: Image.Image, output_format: str, metadata: dict) -> bytes:
    buffer = io.BytesIO()
    kind = FORMATS[output_format][0]
    if kind == "PNG":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, str(value))
        picture.save(buffer, format="PNG", pnginfo=info)
    else:
        picture.save(buffer, format=kind, quality=95)
    return buffer.getvalue()


# -- request fields ---------------------------------------------------------------------------------------------

def _field(body: dict, name: str, kind, default=None, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # multipart forms send numbers as text
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        what = {int: "an integer", float: "a number", str: "a string"}[kind]
        raise ApiError(400, f"{name} must be {what}, got {json.dumps(value)[:40]}", param=name, code="invalid_type")
    if kind is float and not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value}", param=name, code="invalid_value")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"{name} must be in [{low}, {high}], got {value}", param=name, code="invalid_value")
    return value


def _size(body: dict, name: str = "size") -> tuple[int | None, int | None]:
    size = body.get(name, "auto")
    if size in (None, "auto"):
        return None, None
    parts = str(size).lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ApiError(400, f"size must be WIDTHxHEIGHT (e.g. 1024x1024) or auto, got {json.dumps(size)[:40]}",
                       param=name, code="invalid_size")
    return int(parts[0]), int(parts[1])


def job_args(body: dict, width=None, height=None) -> tuple[dict, int, int, str]:
    """(denoise arguments, seed, n, output format) from our fields shared by every route."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "prompt is required: a non-empty string", param="prompt", code="invalid_value")
    cfg = _field(body, "cfg_scale", float) if body.get("cfg_scale") is not None else _field(body, "true_cfg_scale",
                                                                                            float)
    enhance = body.get("enhance_prompt", False)
    if isinstance(enhance, str):  # multipart forms
        enhance = enhance.lower() == "true"
    if not isinstance(enhance, bool):
        raise ApiError(400, "enhance_prompt must be true or false", param="enhance_prompt", code="invalid_type")
    args = {"prompt": prompt, "negative_prompt": _field(body, "negative_prompt", str), "width": width,
            "height": height, "steps": _field(body, "steps", int, low=1, high=1000), "cfg_scale": cfg,
            "enhance_prompt": enhance}
    seed = _field(body, "seed", int, low=-1, high=2**63 - 1 - MAX_IMAGES_PER_REQUEST)
    seed = random.randrange(2**31) if seed is None or seed == -1 else seed
    n = _field(body, "n", int, default=1, low=1, high=MAX_IMAGES_PER_REQUEST)
    output_format = _field(body, "output_format", str, default="png")
    if output_format not in FORMATS:
        raise ApiError(400, f"output_format must be one of {', '.join(FORMATS)}, got {output_format!r}",
                       param="output_format", code="invalid_value")
    return args, seed, n, output_format


def read_picture(data: bytes, name: str) -> Image.Image:
    from .image import open_image

    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(400, f"{name} is {len(data) / 2**20:.0f} MB; uploads are limited to "
                       f"{MAX_UPLOAD_BYTES // 2**20} MB", param=name, code="file_too_large")
    try:
        return open_image(io.BytesIO(data), name=name)
    except ValueError as e:
        raise ApiError(400, f"{name} is not a usable image: {e}", param=name, code="invalid_image") from None


def checked(service: Service, args: dict) -> dict:
    """The arguments, after the pipeline itself checked them (its ValueErrors become 400s)."""
    pipe = service.ready()
    try:
        pipe.denoise(**args, seed=0)  # checks everything; nothing runs until the run is iterated
    except ValueError as e:
        raise ApiError(400, str(e).splitlines()[0], code="invalid_value") from None
    return args


