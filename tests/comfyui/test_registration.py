"""The pack loads in a real ComfyUI: every node listed with tooltips and descriptions, templates listed."""

from __future__ import annotations

import json

from tests.comfyui.harness import PACK_NAME, REPO

NODES = {
    "MetaLoRALoadLoMD",
    "MetaLoRAApply",
    "MetaLoRASaveIdentity",
    "MetaLoRALoadIdentity",
    "MetaLoRAExportLoRA",
    "MetaLoRAFaceCrop",
    "MetaLoRAFaceSimilarity",
}


def test_every_node_has_tooltips_description_category(comfy):
    info = comfy.object_info()
    missing = NODES - set(info)
    assert not missing, f"not registered: {missing}\n{comfy.log_tail()}"
    for name in NODES:
        node = info[name]
        assert node["category"].startswith("MetaLoRA/"), name
        assert len(node["description"]) > 40, name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_dropdowns_list_the_model_folders(comfy):
    info = comfy.object_info()
    lomds = info["MetaLoRALoadLoMD"]["input"]["required"]["lomd_name"]
    identities = info["MetaLoRALoadIdentity"]["input"]["required"]["identity_name"]
    faces = info["MetaLoRAFaceSimilarity"]["input"]["required"]["face_model"]
    flat = json.dumps([lomds, identities, faces])
    assert "lomd.safetensors" in flat and "lomd_misfit.safetensors" in flat
    assert "identity.safetensors" in json.dumps(identities) and "identity.safetensors" not in json.dumps(
        lomds
    )
    assert '"tiny"' in json.dumps(faces)


def test_example_workflows_are_listed_and_served(comfy):
    templates = comfy.get("/workflow_templates")
    expected = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    assert len(expected) >= 2
    assert sorted(templates[PACK_NAME]) == expected
    for stem in expected:
        workflow = comfy.get(f"/api/workflow_templates/{PACK_NAME}/{stem}.json")
        assert workflow["nodes"], stem
