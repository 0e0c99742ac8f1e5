"""``mlx-qwen-image serve``: the ASGI app. The OpenAI Images API (``/v1/images/generations``, ``/v1/images/edits``,
``/v1/models``), an AUTOMATIC1111 subset (``/sdapi/v1/txt2img``, ``img2img``, ``options``, ``sd-models``), job
status and progress (``/v1/jobs/{id}``, server-sent events with ``stream: true``) and the web page at ``/``.

The routes only parse and answer; the jobs, the queue and the resident pipeline are in `jobs`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .jobs import FORMATS, ApiError, Job, Service, _field, _size, checked, job_args, read_picture

SERVED = ("/v1", "/sdapi")  # the routes the API key guards; the page itself is public, its calls are not


class KeyGuard:
    """401 for API calls without the key. Plain ASGI: Starlette's BaseHTTPMiddleware would hide a client's
    disconnect from the routes, and a disconnect is what cancels a job."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        key = self.service.api_key
        if scope["type"] == "http" and key and scope["path"].startswith(SERVED):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {key}":
                error = ApiError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="mlx-qwen-image", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    app.add_middleware(KeyGuard, service=service)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return (Path(__file__).parent / "web" / "index.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models():
        pipe = service.pipe
        about = {"id": service.model, "object": "model", "created": 0, "owned_by": "mlx-qwen-image",
                 "ready": pipe is not None}
        if pipe is not None:
            v = pipe.variant
            about.update(variant=v.class_name, edits=v.edits, optional_images=v.optional_images,
                         max_images=v.max_images, img2img=v.img2img,
                         steps=pipe.scheduler.fixed_steps or v.steps, cfg_scale=v.cfg_scale)
        return {"object": "list", "data": [about]}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        body = await _json(request)
        width, height = _size(body)
        args, seed, n, output_format = job_args(body, width, height)
        _control_into(args, body)
        return await _answer(request, body, args, seed, n, output_format)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        form = await request.form()
        body = {k: v for k, v in form.items() if isinstance(v, str)}
        uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and not isinstance(v, str)]
        if not uploads:
            raise ApiError(400, "image is required: one or more image files (image or image[])", param="image")
        pictures = [read_picture(await u.read(), u.filename or "image") for u in uploads]
        mask = form.get("mask")
        if isinstance(mask, str):
            raise ApiError(400, "mask must be an image file (PNG: transparent where the image is edited)",
                           param="mask", code="invalid_image")
        body["stream"] = body.get("stream", "false").lower() == "true"
        width, height = _size(body)
        args, seed, n, output_format = job_args(body, width, height)
        _pictures_into(service, args, pictures, _field(body, "strength", float))
        if mask is not None:  # OpenAI's convention: the fully transparent pixels are edited
            args["mask"] = read_picture(await mask.read(), mask.filename or "mask")
            args["mask_blur"] = _field(body, "mask_blur", float)
        return await _answer(request, body, args, seed, n, output_format)

    @app.get("/v1/jobs/{job_id}")
    async def job_state(job_id: str):
        return _job(job_id).state()

    @app.get("/v1/images/{job_id}/{name}")
    async def image_file(job_id: str, name: str):
        job = _job(job_id)
        index, _, ext = name.partition(".")
        if not index.isdigit() or int(index) >= len(job.images) or ext != job.output_format:
            raise ApiError(404, f"no image {name} in job {job_id}", code="not_found")
        return Response(job.images[int(index)], media_type=FORMATS[ext][1])

    # -- AUTOMATIC1111 ---------------------------------------------------------------------------------------

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        body = await _json(request)
        return await _a1111(request, body, [])

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        body = await _json(request)
        images = body.get("init_images")
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            raise ApiError(400, "init_images is required: a list of base64 images", param="init_images")
        return await _a1111(request, body, [read_picture(_b64(i, "init_images"), "init_images") for i in images])

    @app.get("/sdapi/v1/options")
    async def options():
        return {"sd_model_checkpoint": service.model, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        await _json(request)  # one resident model: there is nothing to switch
        return {}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": service.model, "model_name": service.model, "hash": None, "sha256": None,
                 "filename": service.model, "config": None}]

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": "Euler", "aliases": ["flow-match Euler"], "options": {}}]

    # -- helpers -------------------------------------------------------------------------------------------------

    def _job(job_id: str) -> Job:
        job = service.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}", param="id", code="not_found")
        return job

    async def _answer(request, body, args, seed, n, output_format):
        response_format = _field(body, "response_format", str, default="b64_json")
        if response_format not in ("b64_json", "url"):
            raise ApiError(400, f"response_format must be b64_json or url, got {response_format!r}",
                           param="response_format", code="invalid_value")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream", code="invalid_type")
        job = service.submit(Job(checked(service, args), seed, n, output_format, _metadata(service, args)))
        if stream:
            return StreamingResponse(_events(request, job), media_type="text/event-stream")
        await _wait(request, job)
        base = str(request.base_url).rstrip("/")
        data = [{"b64_json": base64.b64encode(img).decode()} if response_format == "b64_json" else
                {"url": f"{base}/v1/images/{job.id}/{i}.{output_format}"} for i, img in enumerate(job.images)]
        return {"created": job.created, "data": data, "output_format": output_format}

    async def _a1111(request, body, pictures):
        width, height = _field(body, "width", int), _field(body, "height", int)
        if "batch_size" in body:
            body = {**body, "n": body["batch_size"]}
        args, seed, n, output_format = job_args(body, width, height)
        if pictures:
            _pictures_into(service, args, pictures, _field(body, "denoising_strength", float))
        if pictures and body.get("mask"):  # A1111 inpainting: white repaints, blurred by mask_blur (default 4)
            mask = read_picture(_b64(body["mask"], "mask"), "mask").convert("L")
            if body.get("inpainting_mask_invert") in (1, True, "1", "true"):
                mask = mask.point(lambda v: 255 - v)
            args["mask"], args["mask_blur"] = mask, _field(body, "mask_blur", float, default=4.0)
        job = service.submit(Job(checked(service, args), seed, n, "png", _metadata(service, args)))
        await _wait(request, job)
        seeds = [seed + i for i in range(n)]
        info = {"prompt": args["prompt"], "negative_prompt": args.get("negative_prompt") or "", "seed": seed,
                "all_seeds": seeds, "width": width, "height": height, "job": job.id}
        return {"images": [base64.b64encode(img).decode() for img in job.images], "parameters": body,
                "info": json.dumps(info)}

    async def _wait(request: Request, job: Job):
        while not job.done.is_set():
            if await request.is_disconnected():
                service.cancel(job)
                return
            await asyncio.sleep(0.05)
        if job.error is not None:
            raise job.error

    async def _events(request: Request, job: Job):
        told, sent = 0, 0
        while True:
            if await request.is_disconnected():
                service.cancel(job)
                return
            while told < len(job.progress):  # every step, however fast the steps come
                image, step, total = job.progress[told]
                told += 1
                yield _sse("image_generation.progress", {"type": "image_generation.progress", "job": job.id,
                                                         "image": image, "images": job.n, "step": step,
                                                         "total": total})
            while sent < len(job.images):
                yield _sse("image_generation.completed", {
                    "type": "image_generation.completed", "job": job.id, "index": sent, "created": job.created,
                    "output_format": job.output_format, "seed": job.seed + sent,
                    "b64_json": base64.b64encode(job.images[sent]).decode()})
                sent += 1
            if job.done.is_set() and sent == len(job.images) and told == len(job.progress):
                break
            await asyncio.sleep(0.05)
        if job.error is not None:
            yield _sse("error", job.error.body())

    return app


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name} holds something that is not base64", param=name, code="invalid_image") from None


def _control_into(args: dict, body: dict):
    """ControlNet fields of a JSON request (a server started with --controlnet): ``control_image`` (base64, or a
    list, one per condition), ``control_scale``, ``control_start``, ``control_end`` (numbers or lists)."""
    images = body.get("control_image")
    if images is None:
        return
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise ApiError(400, "control_image must be a base64 image or a list of them", param="control_image")
    args["control_images"] = [read_picture(_b64(i, "control_image"), "control_image") for i in images]
    for name in ("control_scale", "control_start", "control_end"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, list)):
            raise ApiError(400, f"{name} must be a number or a list of numbers", param=name, code="invalid_type")
        args[name] = value  # the pipeline checks the values (a 400 naming what is wrong)


def _pictures_into(service: Service, args: dict, pictures: list, strength):
    """Edit pictures for an editing checkpoint, the img2img picture for a text-to-image one."""
    pipe = service.ready()
    if pipe.variant.edits:
        args["images"] = pictures
    elif len(pictures) > 1:
        raise ApiError(400, f"this checkpoint ({pipe.variant.class_name}) redraws one picture (img2img), got "
                       f"{len(pictures)}", param="image")
    else:
        args["image"], args["strength"] = pictures[0], strength


def _metadata(service: Service, args: dict) -> dict:
    from . import __version__

    return {"prompt": args["prompt"], "negative_prompt": args.get("negative_prompt") or " ",
            "model": service.model, "software": f"mlx-qwen-image {__version__}"}


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
