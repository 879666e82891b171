"""ComfyUI's real front end (headless Chromium): the js extension registers, the R-FaceSim node gets its badge
from a real execution's UI output, progress events feed the Train chart; every example workflow opens with each
widget value on its widget, readable and without overlaps, converts to a prompt whose only validation errors
are missing model files, and runs on the tiny FLUX (the Qwen-Image example: on the tiny Qwen-Image); a fresh
Train node's seed stays fixed."""

from __future__ import annotations

import asyncio
import importlib.util
import uuid

import pytest

from tests.comfyui.browser import chromium_binary, open_page, ready
from tests.comfyui.harness import node

pytestmark = pytest.mark.skipif(
    chromium_binary() is None or importlib.util.find_spec("aiohttp") is None,
    reason="needs a chromium binary and aiohttp to drive ComfyUI's front end headless",
)

RECORD_DRAW = """
(node) => {
  const canvas = document.createElement("canvas");
  canvas.width = 600; canvas.height = 500;
  const ctx = canvas.getContext("2d");
  ctx.translate(0, 80);
  const texts = [];
  const fillText = ctx.fillText.bind(ctx);
  ctx.fillText = (t, x, y) => { texts.push(String(t)); fillText(t, x, y); };
  node.onDrawForeground(ctx, window.app.canvas);
  return texts;
}
"""


def test_extension_badge_and_chart_in_the_real_front_end(comfy):
    async def body(page):
        await ready(page)
        names = await page.evaluate("window.app.extensions.map(e => e.name)")
        assert "metalora.ui" in names
        node_id = await page.evaluate(
            "(() => { const n = LiteGraph.createNode('MetaLoRAFaceSimilarity'); window.app.graph.add(n); return n.id; })()"
        )
        client_id = await page.evaluate("window.app.api.clientId")
        # a real execution whose node id is the page's node: the server's "executed" message reaches onExecuted
        graph = {
            "gen": node("LoadImage", image="noface.png"),
            "ref": node("LoadImage", image="face_b.png"),
            str(node_id): node(
                "MetaLoRAFaceSimilarity", images=["gen", 0], references=["ref", 0], face_model="tiny"
            ),
        }
        comfy.client_id = client_id
        result = await asyncio.to_thread(comfy.run, graph)
        assert result.status == "success", result.error
        score = await page.wait_for(f"window.app.graph.getNodeById({node_id}).metaloraScore", timeout=60)
        assert score["no_face"] == 1 and score["total"] == 1
        texts = await page.evaluate(f"({RECORD_DRAW})(window.app.graph.getNodeById({node_id}))")
        assert "R-FaceSim: no face (0/1 faces)" in texts

        has_train = await page.evaluate("!!LiteGraph.registered_node_types['MetaLoRATrainIdentity']")
        if has_train:
            train_id = await page.evaluate(
                "(() => { const n = LiteGraph.createNode('MetaLoRATrainIdentity'); window.app.graph.add(n); return n.id; })()"
            )
            await page.evaluate(
                "(() => { for (let s = 1; s <= 3; s++) window.app.api.dispatchCustomEvent('metalora.train_progress', "
                f"{{node: '{train_id}', step: s, total: 3, loss: 1 / s, lr: 1e-4, eta_s: 3 - s}}); }})()"
            )
            points = await page.evaluate(
                f"window.app.graph.getNodeById({train_id}).metaloraRun.points.length"
            )
            assert points == 3
            texts = await page.evaluate(f"({RECORD_DRAW})(window.app.graph.getNodeById({train_id}))")
            assert any(t.startswith("step 3/3") for t in texts), texts
        ours = [e for e in page.errors if "metalora" in e.lower()]
        assert not ours, ours
        return True

    original = comfy.client_id
    try:
        assert asyncio.run(open_page(comfy.url + "/", body))
    finally:
        comfy.client_id = original


# --- the example workflows as a user opens them -------------------------------------------------------------

# Screen pixels the front end covers with its own chrome at 1600x900: the left tool bar, the tab bar and the
# floating graph tool bar / Run button row. A node a user must see lies inside the rest.
VISIBLE = (60, 90, 1590, 890)
NAMES = ["personalize", "score", "export", "compose", "lora_tools", "personalize_qwen"]


def test_a_fresh_train_node_keeps_its_seed_fixed(opened):
    widgets = opened["fresh_train"]
    names = [w["name"] for w in widgets]
    control = widgets[names.index("seed") + 1]  # the widget the front end adds after the seed
    assert control["label"] == "control after generate" and "randomize" in control["options"]
    assert control["value"] == "fixed"  # randomize would draw a new seed, and so retrain, on every Run


@pytest.mark.parametrize("name", NAMES)
def test_workflow_widget_values_land_on_their_widgets(opened, comfy, name):
    from tests.comfyui.workflows import widget_values_problems, workflow

    title = _title(name)
    info = comfy.object_info()
    file_nodes = {str(n["id"]): n for n in workflow(title)["nodes"]}
    problems = []
    for loaded in opened["workflows"][title]["nodes"]:
        if loaded["type"] not in info:
            continue  # front-end-only nodes (notes)
        loaded["file_values"] = file_nodes[str(loaded["id"])].get("widgets_values", [])
        problems += widget_values_problems(loaded, info[loaded["type"]])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_readable_without_overlaps(opened, name):
    view = opened["workflows"][_title(name)]
    scale, (ox, oy) = view["ds"]["scale"], view["ds"]["offset"]
    assert scale >= view["threshold"] + 0.05, "at this zoom the front end does not draw node text"

    def screen(b):
        return (
            (b[0] + ox) * scale,
            (b[1] + oy) * scale,
            (b[0] + b[2] + ox) * scale,
            (b[1] + b[3] + oy) * scale,
        )

    nodes = view["nodes"]
    for n in nodes:
        x0, y0, x1, y1 = screen(n["bound"])
        inside = x0 >= VISIBLE[0] and y0 >= VISIBLE[1] and x1 <= VISIBLE[2] and y1 <= VISIBLE[3]
        assert inside, (
            f"{n['title']} (node {n['id']}) is not in view when the workflow opens: {(x0, y0, x1, y1)}"
        )
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            assert not _overlap(a["bound"], b["bound"]), f"{a['title']} overlaps {b['title']}"
    for g in view["groups"]:
        gx, gy, gw, gh = g["bound"]
        for n in nodes:
            if _overlap(g["bound"], n["bound"]):  # a node in a group lies inside it, below its title
                x, y, w, h = n["bound"]
                assert gx <= x and gy + 40 <= y and x + w <= gx + gw and y + h <= gy + gh, (
                    g["title"],
                    n["title"],
                )


@pytest.mark.parametrize("name", NAMES)
def test_workflow_queues_with_only_missing_model_errors(opened, comfy, name):
    from tests.comfyui.harness import ComfyError
    from tests.comfyui.workflows import missing_file_errors_only

    prompt = opened["workflows"][_title(name)]["prompt"]
    with pytest.raises(ComfyError) as refused:  # this server has none of the FLUX.1-dev / Qwen-Image files
        comfy.queue(prompt)
    assert not missing_file_errors_only(refused.value.payload), refused.value.payload


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_on_the_tiny_flux(opened, comfy, comfy_base, request, name):
    from tests.comfyui.workflows import QWEN_IMAGE, on_tiny_model

    if _title(name) in QWEN_IMAGE:
        request.getfixturevalue("tiny_qwen_image")
    prompt = opened["workflows"][_title(name)]["prompt"]
    tag = uuid.uuid4().hex[:8]
    result = comfy.run(on_tiny_model(prompt, tag), timeout=900)
    assert result.status == "success", (result.error or {}).get("exception_message")
    kinds = {prompt[i]["class_type"] for i in result.outputs}
    assert {"SaveImage", "MetaLoRASaveIdentity", "MetaLoRAExportLoRA"} & kinds, result.outputs
    if name == "personalize":
        assert (comfy_base / "models" / "metalora" / f"ohwx_identity_{tag}.safetensors").is_file()
    if name == "export":
        assert (comfy_base / "models" / "loras" / f"metalora_identity_{tag}.safetensors").is_file()
    if name == "compose":  # merge, switch and composite each save their image
        assert len(list((comfy_base / "output").rglob(f"*_{tag}_*.png"))) == 3
    if name == "lora_tools":  # the distilled LoMD, the identity trained on it and one LoRA per tool
        models = comfy_base / "models"
        assert (models / "metalora" / f"distilled_lomd_{tag}.safetensors").is_file()
        assert (models / "metalora" / f"ohwx_identity_distilled_{tag}.safetensors").is_file()
        assert len(list((models / "loras").glob(f"*_{tag}.safetensors"))) == 5
    if name == "personalize_qwen":  # identity, LoRA, image and the R-FaceSim report of the Qwen-Image run
        assert (comfy_base / "models" / "metalora" / f"ohwx_qwen_identity_{tag}.safetensors").is_file()
        assert (comfy_base / "models" / "loras" / f"ohwx_qwen_lora_{tag}.safetensors").is_file()
        assert len(list((comfy_base / "output").glob(f"metalora_qwen_identity_{tag}_*.png"))) == 1
        assert {"MetaLoRAFaceSimilarity", "PreviewAny"} <= kinds, kinds


def _title(name: str) -> str:
    from tests.comfyui import workflows

    return {
        "personalize": workflows.PERSONALIZE,
        "score": workflows.SCORE,
        "export": workflows.EXPORT,
        "compose": workflows.COMPOSE,
        "lora_tools": workflows.LORA_TOOLS,
        "personalize_qwen": workflows.PERSONALIZE_QWEN,
    }[name]


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
