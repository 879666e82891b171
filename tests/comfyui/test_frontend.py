"""The js extension in ComfyUI's real front end (headless Chromium): it registers, the R-FaceSim node gets
its badge from a real execution's UI output, and (when the Train node exists) progress events feed the chart."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from tests.comfyui.browser import chromium_binary, open_page
from tests.comfyui.harness import node

pytestmark = pytest.mark.skipif(
    chromium_binary() is None or importlib.util.find_spec("aiohttp") is None,
    reason="needs a chromium binary and aiohttp to drive ComfyUI's front end headless",
)

READY = "!!(window.app && window.app.graph && window.LiteGraph && window.app.extensions?.length && window.app.api?.clientId)"

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
        await page.wait_for(READY, timeout=120)
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
