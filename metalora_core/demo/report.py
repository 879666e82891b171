"""report.html (self-contained: images inline, loss curves as inline SVG) and report.json of a demo run."""

from __future__ import annotations

import base64
import html
import json
import mimetypes
from dataclasses import asdict
from pathlib import Path

from ..safeio import atomic_write_bytes
from .pipeline import DemoRun

COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")
TINY_BANNER = (
    "These are tiny random models (a FLUX 128 units wide, random text features, face models that only "
    "detect a drawn marker). The run shows the mechanics of every stage and their costs, not quality: "
    "the images are noise-like and no face is found in them. Give real weights (--flux, --vae, --lomd, "
    "--face-model) and the same command runs the real pipeline."
)


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_svg(curves: dict[str, list[float]], width: int = 720, height: int = 300) -> str:
    """Raw losses faint, moving averages bold, one colour per method, shared axes."""
    pad_l, pad_r, pad_t, pad_b = 70, 12, 12, 36
    values = [v for c in curves.values() for v in c]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    steps = max(len(c) for c in curves.values())

    def xy(i: int, v: float) -> str:
        x = pad_l + (width - pad_l - pad_r) * (i / max(1, steps - 1))
        y = pad_t + (height - pad_t - pad_b) * (1 - (v - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(
        f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" height="{height - pad_t - pad_b}" fill="none" stroke="#999"/>'
    )
    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        y = pad_t + (height - pad_t - pad_b) * (1 - frac)
        parts.append(f'<text x="{pad_l - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:.3f}</text>')
    mid_y = pad_t + (height - pad_t - pad_b) / 2
    parts.append(
        f'<text x="14" y="{mid_y:.1f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {mid_y:.1f})">training loss (flow matching)</text>'
    )
    parts.append(f'<text x="{pad_l}" y="{height - 10}" font-size="11">step 1</text>')
    parts.append(
        f'<text x="{width - pad_r}" y="{height - 10}" font-size="11" text-anchor="end">step {steps}</text>'
    )
    window = max(1, steps // 10)
    for k, (name, losses) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        raw = " ".join(xy(i, v) for i, v in enumerate(losses))
        smooth = " ".join(xy(i, v) for i, v in enumerate(moving_average(losses, window)))
        parts.append(
            f'<polyline points="{raw}" fill="none" stroke="{colour}" stroke-opacity="0.25" stroke-width="1"/>'
        )
        parts.append(f'<polyline points="{smooth}" fill="none" stroke="{colour}" stroke-width="2.5"/>')
        parts.append(
            f'<text x="{width - pad_r - 8}" y="{pad_t + 16 + 15 * k}" font-size="12" fill="{colour}" '
            f'text-anchor="end">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _img(out: Path, rel: str, caption: str) -> str:
    path = out / rel
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption)}" width="160">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


TINY_FACES = (
    "Why the scores are empty here: the tiny face models are random networks built to find one drawn marker, "
    "not faces, so they find no face in the generated images (noise-like on tiny FLUX) nor in the photo of "
    "a real face. Nothing failed: with a real face model (--face-model antelopev2) these cells hold the "
    "identity score against the person's other photos."
)


def scores_section(sc: dict, tiny: bool) -> list[str]:
    """The Scores section: every cell holds a value or the reason it has none, at the place it is empty."""
    if "skipped" in sc:
        return [f"<p>{html.escape(sc['skipped'])}</p>"]
    total, no_face = sc.get("total", 0), sc.get("no_face", 0)
    none_found = f"not computed: none of the {total} generated images has a detectable face"
    score = sc.get("score")
    percent = sc.get("percent")
    row = [
        f"{score:.4f}" if score is not None else none_found,
        f"{percent:.1f} % (threshold {sc.get('threshold')})"
        if percent is not None
        else "not computed: no R-FaceSim",
        sc.get("verdict") or "-",
        f"{no_face} of {total}",
        f"{len(sc.get('references_used', []))} ({', '.join(sc.get('references_used', [])) or 'none'})",
        sc.get("model") or "-",
    ]
    parts = []
    if tiny and score is None:
        parts.append(f"<p class='banner'>{html.escape(TINY_FACES)}</p>")
    parts.append(
        _table(
            ["R-FaceSim", "percent", "verdict", "images without a face", "references used", "face model"],
            [row],
        )
    )
    for warning in sc.get("warnings", []):
        if tiny and "no detectable face" in warning:
            warning += " (tiny face models find only a drawn marker, never a real face: see above)"
        parts.append(f"<p>{html.escape(warning)}</p>")
    return parts


def render_html(run: DemoRun, out: Path, tiny: bool) -> str:
    s = []
    s.append("<!doctype html><html><head><meta charset='utf-8'><title>Meta-LoRA demo report</title><style>")
    s.append(
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "figure{display:inline-block;margin:4px;text-align:center;font-size:12px}"
        ".banner{background:#fff4ce;border:1px solid #e0c060;padding:.8em 1em;border-radius:6px}"
        "pre{background:#f4f4f4;padding:.8em;overflow-x:auto;font-size:12px}"
    )
    s.append("</style></head><body><h1>Meta-LoRA for FLUX.1: demo report</h1>")
    if tiny:
        s.append(f"<p class='banner'><b>Mechanics, not quality.</b> {html.escape(TINY_BANNER)}</p>")
    for note in run.notes:
        s.append(f"<p class='banner'>{html.escape(note)}</p>")
    s.append("<h2>Personalization: Meta-LoRA against plain LoRA on the same budget</h2>")
    s.append(
        "<p>Same photo views, timesteps, noise, optimizer, learning rate and steps for every method (the draws "
        "are paired, so the first losses are equal). Faint: the loss of each step; bold: moving average. "
        "The mean of the last quarter compares the methods; on tiny random models with a LoMD meta-trained on "
        "drawn faces for a few steps it shows that both train, not which is better on real photos.</p>"
    )
    s.append(loss_svg({name: m["losses"] for name, m in run.methods.items()}))
    rows = [
        [name, m["first_loss"], m["last_quarter_loss"], m["trained_parameters"], m["seconds"]]
        for name, m in run.methods.items()
    ]
    s.append(
        _table(["method", "first loss", "mean loss, last quarter", "trained parameters", "train s"], rows)
    )
    s.append("<h2>LoMD</h2>")
    s.append(_table(["kind", "source", "file"], [[k, v["source"], v["file"]] for k, v in run.lomds.items()]))
    s.append("<h2>Images</h2><div>")
    for rel in run.images.get("photo", []):
        s.append(_img(out, rel, "the one photo"))
    for i, rel in enumerate(run.images.get("views", [])):
        s.append(_img(out, rel, f"training view {i}"))
    for path in run.images.get("references", [])[:4]:
        rel = str(Path(path).relative_to(out)) if Path(path).is_relative_to(out) else None
        if rel:
            s.append(_img(out, rel, "reference (another photo)"))
    s.append("</div><div>")
    for i, rel in enumerate(run.images.get("base", [])):
        s.append(_img(out, rel, f"base model, seed {i}"))
    s.append("</div><div>")
    changes = run.images.get("pixel_change", [])
    for i, rel in enumerate(run.images.get("identity", [])):
        change = f", differs {changes[i]:.3f}" if i < len(changes) else ""
        s.append(_img(out, rel, f"identity, seed {i}{change}"))
    s.append(
        "</div><p>Same seeds with and without the identity; the number is the mean absolute pixel difference "
        "(0 to 1) from the base image of the same seed.</p>"
    )
    s.append("<h2>Scores (R-FaceSim)</h2>")
    s.extend(scores_section(run.scores, tiny))
    s.append("<h2>Export</h2>")
    ex = run.export
    s.append(
        _table(
            ["standard LoRA", "format", "rank", "layers", "bytes", "identity file bytes"],
            [[ex.get("written"), ex.get("format"), ex.get("rank"), ex.get("targets"), ex.get("bytes"), ex.get("identity_bytes")]],
        )
    )  # fmt: skip
    s.append(
        "<p>Load it with ComfyUI's stock <i>LoraLoaderModelOnly</i> (models/loras/) or diffusers' load_lora_weights.</p>"
    )
    s.append("<h2>Timings</h2>")
    total_wall = sum(t["wall_s"] for t in run.timings)
    total_cpu = sum(t["cpu_s"] for t in run.timings)
    rows = [[t["name"], t["wall_s"], t["cpu_s"]] for t in run.timings] + [["total", total_wall, total_cpu]]
    s.append(_table(["stage", "wall s", "CPU s (this process, all threads)"], rows))
    env = run.environment
    s.append(
        f"<p>torch {html.escape(str(env.get('torch')))}, {env.get('threads')} threads, device {html.escape(str(env.get('device')))}.</p>"
    )
    s.append("<h2>Commands to reproduce</h2><pre>")
    s.append(html.escape("\n".join(run.commands)))
    s.append(
        "</pre><p>Everything above again, in one command: <code>metalora demo --out DIR</code> (seeded: the same losses and files; only the timings differ).</p>"
    )
    s.append("</body></html>")
    return "\n".join(s)


def write_report(run: DemoRun, out: Path, tiny: bool) -> tuple[Path, Path]:
    data = json.dumps(asdict(run), indent=2, default=str).encode()
    json_path = atomic_write_bytes(out / "report.json", lambda tmp: Path(tmp).write_bytes(data))
    page = render_html(run, out, tiny).encode()
    html_path = atomic_write_bytes(out / "report.html", lambda tmp: Path(tmp).write_bytes(page))
    return html_path, json_path
