"""The example workflows as a user gets them, and what the tests check about them (shared by the front-end,
comfy-cli and in-process tests).

ComfyUI titles a pack's templates with their file names, so the names are the titles users read.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from tests.comfyui.harness import REPO

EXAMPLES = REPO / "example_workflows"
PERSONALIZE = "Meta-LoRA 1 - Personalize FLUX.1-dev from one photo"
SCORE = "Meta-LoRA 2 - Score an identity with R-FaceSim"
EXPORT = "Meta-LoRA 3 - Export an identity as a standard LoRA"
COMPOSE = "Meta-LoRA 4 - Compose an identity with a style LoRA"
LORA_TOOLS = "Meta-LoRA 5 - Make a LoMD from your LoRAs, and LoRA file tools"
PERSONALIZE_QWEN = "Meta-LoRA 6 - Personalize Qwen-Image from one photo"
ALL = (PERSONALIZE, SCORE, EXPORT, COMPOSE, LORA_TOOLS, PERSONALIZE_QWEN)
QWEN_IMAGE = (PERSONALIZE_QWEN,)  # the examples made for Qwen-Image (the others are FLUX.1-dev's)


def workflow(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


# Inputs that name a file the user must provide (a model, a photo): the only validation errors a freshly
# loaded example may raise on a server that lacks those files.
FILE_INPUTS = {
    "unet_name",
    "clip_name",
    "clip_name1",
    "clip_name2",
    "vae_name",
    "lora_name",
    "lomd_name",
    "identity_name",
    "image",
    "face_model",
    "lora_a",  # the LoRA tools' inputs
    "lora_b",
    "lora_1",
    "lora_2",
    "lora",
    "base_model",
    "tuned_model",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")


def combo_options(spec: list) -> list | None:
    """The options of a COMBO input spec (old form: a list as the type; V3 form: "COMBO" + options)."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options")
    return None


def widget_problem(name: str, value: object, spec: list) -> str | None:
    """Why ``value`` cannot be the value of widget input ``name`` declared as ``spec`` (None if it can)."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    options = combo_options(spec)
    if options is not None:
        if value in options or (name in FILE_INPUTS and isinstance(value, str) and value):
            return None
        return f"{value!r} is not one of {options[:8]}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not text"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"{value!r} is not a number"
        if kind == "INT" and int(value) != value:
            return f"{value!r} is not an integer"
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            return f"{value!r} is outside [{opts.get('min')}, {opts.get('max')}]"
    return None


def node_inputs(info: dict) -> dict[str, list]:
    """Every input spec of an /object_info entry, by name."""
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def widget_values_problems(loaded: dict, info: dict) -> list[str]:
    """What is wrong with one node as the front end loaded it (``loaded``: type, widgets [[name, value]],
    serialized values, the file's widgets_values) against its /object_info entry."""
    problems = []
    where = f"node {loaded['id']} ({loaded['type']})"
    if loaded["serialized"] != loaded["file_values"]:
        problems.append(
            f"{where}: the front end holds {loaded['serialized']} but the file has {loaded['file_values']} "
            "(a value per widget, the control_after_generate ones included)"
        )
    specs = node_inputs(info)
    names = [name for name, _ in loaded["widgets"]]
    # the front end names a seed's control widget control_after_generate, or after the declared string
    controls = {"control_after_generate"} | {
        spec[1]["control_after_generate"]
        for spec in specs.values()
        if len(spec) > 1
        and isinstance(spec[1], dict)
        and isinstance(spec[1].get("control_after_generate"), str)
    }
    for name, spec in specs.items():
        if (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and name not in names:
            if name not in loaded["linked_inputs"]:
                problems.append(f"{where}: no widget for input {name!r}")
    for name, value in loaded["widgets"]:
        if name in controls or name.endswith(" control_after_generate"):
            if value not in SEED_CONTROLS:
                problems.append(f"{where}: control_after_generate = {value!r}")
        elif name in specs:
            why = widget_problem(name, value, specs[name])
            if why:
                problems.append(f"{where}: widget {name!r}: {why}")
    return problems


def missing_file_errors_only(payload: dict) -> list[str]:
    """The validation errors of a refused /prompt that are NOT a missing model or photo file."""
    bad = []
    for node_id, entry in (payload.get("node_errors") or {}).items():
        for err in entry.get("errors", []):
            name = (err.get("extra_info") or {}).get("input_name")
            if err.get("type") in ("value_not_in_list", "custom_validation_failed") and name in FILE_INPUTS:
                continue
            bad.append(f"{node_id} {entry.get('class_type')}: {err.get('type')} {name}: {err.get('details')}")
    if not payload.get("node_errors"):
        bad.append(f"refused without node errors: {payload.get('error')}")
    return bad


STYLE_A, STYLE_B = "style_lora.safetensors", "style_lora_b.safetensors"  # in the test base's models/loras
LORA_TOOL_NODES = (
    "MetaLoRALoraDifference",
    "MetaLoRALoraMerge",
    "MetaLoRALoraResize",
    "MetaLoRALoraRescale",
    "MetaLoRALoraExtract",
)


# what every tiny run changes, whatever the model: 2 training and sampling steps, 64 px, the tiny face models
TINY_RUN = {
    "MetaLoRATrainIdentity": {"steps": 2, "resolution": 256, "views": 2, "warmup_steps": 0},
    "KSampler": {"steps": 2},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "MetaLoRAFaceSimilarity": {"face_model": "tiny"},
    "MetaLoRAFaceCrop": {"face_model": "tiny"},
}


def on_tiny_flux(prompt: dict, tag: str) -> dict:
    """An API prompt converted by the front end, with the tiny FLUX and the test nodes substituted for the
    FLUX.1-dev files (text encoders and VAE become the test nodes), 2 steps, the test base's LoRAs and
    checkpoints for the user's, and saved file names (identities, LoRAs, LoMDs, images) tagged unique."""
    from tests.comfyui.graphs import TINY_COND
    from tests.comfyui.harness import node

    out = {}
    photos = iter(
        ["face_a.png", "face_b.png", "face_a2.png"]
    )  # different people: a reference is not the photo
    for node_id, entry in sorted(prompt.items(), key=lambda item: int(item[0])):
        kind, inputs = entry["class_type"], dict(entry["inputs"])
        if kind == "DualCLIPLoader":
            continue
        if kind == "CLIPTextEncode":
            out[node_id] = node("MetaLoRATestConditioning", seed=int(node_id), tokens=8, **TINY_COND)
            continue
        if kind == "VAELoader":
            out[node_id] = node("MetaLoRATestVAE", seed=0)
            continue
        changes = {
            "UNETLoader": {"unet_name": "tiny_flux.safetensors"},
            "MetaLoRALoadLoMD": {"lomd_name": "lomd.safetensors"},
            # the examples make their LoMD with Seeded LoMD: an identity trained on that one
            "MetaLoRALoadIdentity": {"identity_name": "identity_seeded.safetensors"},
            "LoadImage": {"image": next(photos)} if kind == "LoadImage" else {},
            **TINY_RUN,
            "MetaLoRAAdapterLoRA": {"lora_name": "style_lora.safetensors"},
            # two LoRAs of the tiny FLUX (not the whole loras folder other tests keep writing into)
            "MetaLoRADistillLoMD": {"loras": f"{STYLE_A}\n{STYLE_B}"},
            "MetaLoRALoraDifference": {"lora_a": STYLE_A, "lora_b": STYLE_B},
            "MetaLoRALoraMerge": {"lora_1": STYLE_A, "lora_2": STYLE_B},
            "MetaLoRALoraResize": {"lora": STYLE_A, "rank": 2},
            "MetaLoRALoraRescale": {"lora": STYLE_A},
            "MetaLoRALoraExtract": {
                "base_model": "tiny_flux.safetensors",
                "tuned_model": "tiny_flux_tuned.safetensors",
                "rank": 2,
            },
        }.get(kind, {})
        if kind in ("MetaLoRASaveIdentity", "MetaLoRAExportLoRA") or kind in LORA_TOOL_NODES:
            changes = {**changes, "filename": f"{inputs['filename']}_{tag}"}
        if kind == "MetaLoRADistillLoMD" and inputs["save_as"]:
            changes = {**changes, "save_as": f"{inputs['save_as']}_{tag}"}
        if kind == "SaveImage":
            changes = {"filename_prefix": f"{inputs['filename_prefix']}_{tag}"}
        out[node_id] = {**entry, "inputs": {**inputs, **changes}}
    return out


# The tiny Qwen-Image in the test base (conftest's ``tiny_qwen_image`` fixture writes it on first use): ComfyUI's
# real width (3072 = 24 heads x 128, Qwen2.5-VL's 3584-wide text) with one block, the only size it loads.
TINY_QWEN_FILE = "tiny_qwen_image.safetensors"
QWEN_CONTEXT_DIM = 3584


def is_qwen_image(prompt: dict) -> bool:
    """Whether an API prompt loads a Qwen-Image (a CLIPLoader of type qwen_image, or a Qwen transformer file)."""
    for entry in prompt.values():
        inputs = entry["inputs"]
        if entry["class_type"] == "CLIPLoader" and inputs.get("type") == "qwen_image":
            return True
        if entry["class_type"] == "UNETLoader" and str(inputs.get("unet_name", "")).startswith("qwen_image"):
            return True
    return False


def on_tiny_qwen_image(prompt: dict, tag: str) -> dict:
    """An API prompt of a Qwen-Image example with the test base's tiny Qwen-Image and test nodes substituted
    for Qwen-Image's files: Qwen2.5-VL's conditioning (3584 wide, no pooled output) from the test conditioning
    node, the Qwen (Wan 2.1, 5-D latent) VAE from the test video VAE; 64x64, 2 sampling and 2 training steps at
    the node's smallest resolution; saved file names tagged unique. ModelSamplingAuraFlow stays as it is."""
    from tests.comfyui.harness import node

    out = {}
    photos = iter(["face_a.png", "face_b.png"])
    for node_id, entry in sorted(prompt.items(), key=lambda item: int(item[0])):
        kind, inputs = entry["class_type"], dict(entry["inputs"])
        if kind == "CLIPLoader":
            continue
        if kind == "CLIPTextEncode":
            out[node_id] = node(
                "MetaLoRATestConditioning",
                seed=int(node_id),
                tokens=8,
                context_dim=QWEN_CONTEXT_DIM,
                pooled_dim=0,
            )
            continue
        if kind == "VAELoader":
            out[node_id] = node("MetaLoRATestQwenVAE", seed=0)
            continue
        changes = {
            "UNETLoader": {"unet_name": TINY_QWEN_FILE},
            "LoadImage": {"image": next(photos)} if kind == "LoadImage" else {},
            **TINY_RUN,
        }.get(kind, {})
        if kind in ("MetaLoRASaveIdentity", "MetaLoRAExportLoRA"):
            changes = {**changes, "filename": f"{inputs['filename']}_{tag}"}
        if kind == "SaveImage":
            changes = {"filename_prefix": f"{inputs['filename_prefix']}_{tag}"}
        out[node_id] = {**entry, "inputs": {**inputs, **changes}}
    return out


def on_tiny_model(prompt: dict, tag: str) -> dict:
    """:func:`on_tiny_qwen_image` for a Qwen-Image example, :func:`on_tiny_flux` for a FLUX.1-dev one."""
    return (on_tiny_qwen_image if is_qwen_image(prompt) else on_tiny_flux)(prompt, tag)


LOAD_AND_DUMP = """
async (wf, name) => {
  await window.app.loadGraphData(wf, true, true, name);
  await new Promise(r => setTimeout(r, 500));
  const app = window.app, c = app.canvas;
  const nodes = app.graph._nodes.map(n => {
    const ser = n.serialize();
    return {id: n.id, type: n.type, title: n.title, mode: n.mode, bound: Array.from(n.getBounding()),
            widgets: (n.widgets || []).map(w => [w.name, w.value]),
            serialized: ser.widgets_values ?? [],
            linked_inputs: (n.inputs || []).filter(i => i.link != null).map(i => i.name)};
  });
  const groups = app.graph._groups.map(g => ({title: g.title, bound: Array.from(g._bounding)}));
  const prompt = await app.graphToPrompt();
  const threshold = app.ui.settings.getSettingValue("LiteGraph.Canvas.LowQualityRenderingZoomThreshold") ?? 0.6;
  return {ds: {scale: c.ds.scale, offset: Array.from(c.ds.offset)}, nodes, groups, threshold,
          prompt: prompt.output};
}
"""


def open_in_front_end(comfy) -> dict:
    """Every example workflow loaded in the real front end: what it shows and the prompt it converts to.

    Set METALORA_SCREENSHOTS=<folder> to keep a PNG of each as a user sees it (1600x900)."""
    from tests.comfyui.browser import open_page, ready

    shots = os.environ.get("METALORA_SCREENSHOTS")
    comfy.post("/settings/Comfy.TutorialCompleted", True)  # no first-visit template dialog over the graph

    async def body(page):
        await ready(page)
        out = {}
        for name in ALL:
            out[name] = await page.evaluate(
                f"({LOAD_AND_DUMP})({json.dumps(workflow(name))}, {json.dumps(name)})"
            )
            if shots:
                await asyncio.sleep(1.0)
                await page.screenshot(Path(shots) / f"{name}.png")
        fresh = await page.evaluate(
            "(() => { const n = LiteGraph.createNode('MetaLoRATrainIdentity');"
            " return n.widgets.map(w => ({name: w.name, value: w.value, label: w.label,"
            " options: w.options?.values ?? null})); })()"
        )
        return {"workflows": out, "fresh_train": fresh, "errors": page.errors}

    return asyncio.run(open_page(comfy.url + "/", body))
