"""What a multi-Mac run sends between ranks per denoising step, by `--parallel` mode, and the time links need for it.

Counted from the model's shapes, not measured: the bytes each rank sends in one CFG step of the full model
(prompt and negative prompt) and the bandwidth-bound time at a link's nominal rate (a lower bound: TCP, latency
and the per-collective start add to it).

- ``cfg``: one all-gather of the velocity, (image tokens, 64) per rank.
- ``tensor``: per block, one all-reduce after attention's output projections and one after the MLP's second
  layer, for the image and the text stream, over both CFG rows; a ring all-reduce over p ranks sends
  2(p-1)/p of the array from each. The last block's text outputs feed nothing, so they are never computed.
- ``data``: nothing per step (a seed and a time stamp once, a barrier at the end).
"""

from __future__ import annotations

from mlx_qwen_image.config import TransformerConfig

LINKS = {"Thunderbolt 5": 80e9 / 8, "Thunderbolt 4": 40e9 / 8, "10 GbE": 10e9 / 8}  # bytes/s, nominal


def step_traffic(mode: str, cfg: TransformerConfig, n_img: int, n_txt: int, ranks: int = 2,
                 dtype_bytes: int = 2, rows: int = 2) -> dict:
    """Bytes each rank sends per step (``rows``: 2 with CFG) and the collectives that carry them; ``payload``:
    the size of the arrays reduced or gathered."""
    d = cfg.inner_dim
    if mode == "cfg":
        velocity = n_img * cfg.patch_size**2 * cfg.out_channels * dtype_bytes
        return {"bytes": velocity * (ranks - 1), "payload": velocity * ranks, "collectives": 1}
    if mode == "tensor":
        per_block = 2 * (n_img + n_txt) * d * rows * dtype_bytes
        payload = cfg.num_layers * per_block - 2 * n_txt * d * rows * dtype_bytes
        return {"bytes": payload * 2 * (ranks - 1) / ranks, "payload": payload, "collectives": 4 * cfg.num_layers - 2}
    if mode == "data":
        return {"bytes": 0, "payload": 0, "collectives": 0}
    raise ValueError(f"unknown mode {mode!r}")


def traffic_rows(width: int = 1024, height: int = 1024, n_txt: int = 64, ranks: int = 2,
                 dtype_bytes: int = 2) -> list[dict]:
    """Every mode's traffic for the full model at ``width`` x ``height``, with each link's time."""
    cfg, n_img = TransformerConfig(), (width // 16) * (height // 16)
    rows = []
    for mode in ("cfg", "tensor", "data"):
        t = step_traffic(mode, cfg, n_img, n_txt, ranks, dtype_bytes)
        rows.append({"mode": mode, "size": f"{width}x{height}", "text_tokens": n_txt, "ranks": ranks, **t,
                     "seconds": {name: t["bytes"] / rate for name, rate in LINKS.items()}})
    return rows


def markdown(rows: list[dict]) -> list[str]:
    links = list(LINKS)
    lines = [f"| mode | bytes sent per rank per step | collectives | {' | '.join(links)} |",
             "| --- | ---: | ---: |" + " ---: |" * len(links)]
    for r in rows:
        times = " | ".join(_seconds(r["seconds"][name]) for name in links)
        lines.append(f"| {r['mode']} | {_bytes(r['bytes'])} | {r['collectives']} | {times} |")
    return lines


def _bytes(n: float) -> str:
    if n == 0:
        return "0"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _seconds(s: float) -> str:
    if s == 0:
        return "0"
    return f"{s:.2f} s" if s >= 0.1 else f"{s * 1e3:.2f} ms" if s >= 1e-4 else f"{s * 1e6:.0f} µs"
