"""The benchmark's markdown report, and our figures beside the published ones (cuda_reference.json)."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_qwen_image.config import TransformerConfig

from .flops import transformer_step_flops

REFERENCES = Path(__file__).resolve().parent / "cuda_reference.json"


def load_references() -> dict:
    return json.loads(REFERENCES.read_text())


def _num(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def _span(lo: float, hi: float, fmt: str = "") -> str:
    a, b = (fmt.format(lo), fmt.format(hi)) if fmt else (_num(lo), _num(hi))
    return a if a == b else f"{a}-{b}"


def reference_rows(result: dict) -> list[dict]:
    """Each published figure with the FLOP rate and efficiency it implies, and this run's projected s/step for the
    same job: the job's FLOPs (60 blocks) at the FLOP rate our CFG step reached here."""
    refs = load_references()
    ours = result["phases"]["step_cfg"]["flops_per_s"]
    rows = []
    for e in refs["entries"]:
        n_img = (e["width"] // 16) * (e["height"] // 16)
        batches = [1, 2] if e["cfg"] is None else [2 if e["cfg"] else 1]
        flops = [transformer_step_flops(TransformerConfig(), b, n_img, refs["nominal_text_tokens"])["total"]
                 for b in batches]
        lo_s, hi_s = e["seconds_per_step"]
        implied = (min(flops) / hi_s, max(flops) / lo_s)
        rows.append({
            "name": e["name"], "hardware": e["hardware"], "size": f"{e['width']}x{e['height']}",
            "cfg": e["cfg"], "seconds_per_step": [lo_s, hi_s], "step_flops": flops,
            "implied_flops_per_s": list(implied),
            "implied_efficiency": [r / (e["chip_tflops"] * 1e12) for r in implied] if e["chip_tflops"] else None,
            "chip_rate_kind": e["chip_rate_kind"], "source": e["source"],
            "ours_seconds_per_step": [f / ours for f in flops],
        })
    return rows


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def markdown(result: dict) -> str:
    c, ph, dev = result["config"], result["phases"], result["device"]
    where = "CPU" if dev["type"] == "cpu" else dev.get("device_name", "GPU")
    quant = f"{c['quantize']}-bit (mixed recipe)" if c["quantize"] else "none"
    width = "of full width" if c["full_width"] else f"{c['inner_dim']} wide"
    lines = [
        f"## mlx-qwen-image benchmark on {where}" + (" (CPU figures)" if dev["type"] == "cpu" else ""),
        "",
        f"{c['width']}x{c['height']} ({c['image_tokens']} image + {c['text_tokens']} text tokens), "
        f"{c['blocks']} transformer block(s) {width}"
        f", {c['dtype']}, quantization {quant}, modulations: {c['modulations']}"
        f"{' (weights kept)' if c['keep_modulation_weights'] else ''}, compile {'on' if c['compile'] else 'off'}; "
        f"median of {c['trials']} after {c['warmup']} warm-up, seed {c['seed']}, MLX {result['software']['mlx']}."
        + (" Tiny CI components: figures meaningless." if c["tiny"] else ""),
        "",
        "| phase | seconds | peak memory | FLOP/s | efficiency |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rate = result["matmul"]["flops_per_s"]
    lines.append(f"| plain matmul ({result['matmul']['dtype']}, the CFG step's linear shapes) | | | "
                 f"{rate / 1e12:.3g} T | 100% |")
    for name, label in (("text_encoder", f"text encoder ({ph.get('text_encoder', {}).get('layers')} layer(s), "
                                         "prompt + negative)"),
                        ("modulation_table", f"modulation table ({c['steps']} steps)"),
                        ("step_cfg", "transformer step, CFG (batch 2)"),
                        ("step_nocfg", "transformer step, no CFG"),
                        ("vae_decode", "VAE decode")):
        if name not in ph:
            continue
        p = ph[name]
        fl = f"{p['flops_per_s'] / 1e12:.3g} T" if "flops_per_s" in p else ""
        eff = f"{p['efficiency']:.1%}" if "efficiency" in p else ""
        lines.append(f"| {label} | {p['seconds']:.4g} | {_gb(p['peak_memory'])} | {fl} | {eff} |")
    if "cache" in ph:
        k = ph["cache"]
        lines += ["", f"Step cache {k['setting']}: a {k['steps']}-step CFG image in {k['seconds_with']:.3g} s "
                      f"instead of {k['seconds_without']:.3g} s ({k['speedup']:.2f}x), {k['computed']} of "
                      f"{k['passes']} transformer passes computed in full (random weights: what a real model skips "
                      "differs)."]
    w = result["weights"]
    lines += ["", "Efficiency: the step's counted FLOP/s over the plain matmul's, timed right after each trial (median "
                  "of the ratios); FLOPs as benchmarks/flops.py counts them."]
    lines += ["", f"Transformer weights resident during the steps: {_gb(w['resident_bytes'])}"
              f" (modulation weights {'dropped' if w['modulation_weights_dropped'] else 'kept'})."]

    if "parallel" in result:
        from .communication import markdown as traffic_table

        par = result["parallel"]
        how = {"cfg": "rank 0 the prompt's branch, rank 1 the negative prompt's; the CFG step's figures are one "
                      "rank's, the exchange included",
               "tensor": f"every block split {par['ranks']} ways; the figures and the resident weights are one "
                         "rank's",
               "data": "each rank makes its own images: the step as alone, images per hour times the ranks"}
        t = par["traffic"][0]
        lines += ["", f"Several Macs: {par['ranks']} ranks, --parallel {par['mode']} ({how[par['mode']]}). What "
                      f"each mode sends per CFG step of the full model at {t['size']} ({t['text_tokens']} text "
                      "tokens, bf16), counted from the shapes, and the time it takes at each link's nominal rate "
                      "(a lower bound):", "", *traffic_table(par["traffic"])]

    proj = result.get("projection")
    if proj:
        lines += ["", "Full model (60 blocks, 28 text layers) at this size — "
                      f"measured: {', '.join(proj['measured'])}; extrapolated by FLOPs: "
                      f"{', '.join(proj['extrapolated']) or 'nothing'}.", "",
                  "| figure | seconds |", "| --- | ---: |",
                  f"| transformer step, CFG | {_num(proj['step_cfg_seconds'])} |",
                  f"| transformer step, no CFG | {_num(proj['step_nocfg_seconds'])} |"]
        for name in ("cfg", "nocfg"):
            if f"image_seconds_{name}" in proj:
                label = "CFG" if name == "cfg" else "no CFG"
                lines.append(f"| whole image, {c['steps']} steps, {label} | {_num(proj[f'image_seconds_{name}'])} |")
    if result.get("references"):
        lines += ["", "Published figures (benchmarks/cuda_reference.md) and this machine on the same job, at the "
                      "FLOP rate its CFG step reached here:", "",
                  "| published | size | CFG | s/step | implied FLOP/s | of chip rate | this machine, s/step |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in result["references"]:
            eff = _span(*r["implied_efficiency"], "{:.0%}") if r["implied_efficiency"] else "n/a"
            cfg = {True: "on", False: "off", None: "?"}[r["cfg"]]
            lines.append(f"| {r['name']} | {r['size']} | {cfg} | {_span(*r['seconds_per_step'])} | "
                         f"{_span(*[v / 1e12 for v in r['implied_flops_per_s']])} T | {eff} | "
                         f"{_span(min(r['ours_seconds_per_step']), max(r['ours_seconds_per_step']))} |")
    return "\n".join(lines) + "\n"
