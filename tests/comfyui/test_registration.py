"""The pack loads in a real ComfyUI: every node listed with tooltips and descriptions, templates listed."""

from __future__ import annotations

import json
from urllib.parse import quote

from tests.comfyui.graphs import loaders
from tests.comfyui.harness import PACK_NAME, REPO

NODES = {  # every node the pack ships; a node missing here is caught by the "every MetaLoRA node" loop below
    "MetaLoRALoadLoMD",
    "MetaLoRASeededLoMD",
    "MetaLoRADistillLoMD",
    "MetaLoRAApply",
    "MetaLoRATrainIdentity",
    "MetaLoRASaveIdentity",
    "MetaLoRALoadIdentity",
    "MetaLoRAExportLoRA",
    "MetaLoRAFaceCrop",
    "MetaLoRAFaceSimilarity",
    "MetaLoRAAdapterIdentity",
    "MetaLoRAAdapterLoRA",
    "MetaLoRAComposeMerge",
    "MetaLoRAComposeSwitch",
    "MetaLoRAComposeComposite",
    "MetaLoRALoraDifference",
    "MetaLoRALoraMerge",
    "MetaLoRALoraResize",
    "MetaLoRALoraRescale",
    "MetaLoRALoraExtract",
}


def test_every_node_has_tooltips_description_category(comfy):
    info = comfy.object_info()
    missing = NODES - set(info)
    assert not missing, f"not registered: {missing}\n{comfy.log_tail()}"
    shipped = {n for n, v in info.items() if n.startswith("MetaLoRA") and v["category"] != "MetaLoRA/testing"}
    assert shipped == NODES, f"list every shipped node here: {sorted(shipped ^ NODES)}"
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
    assert "lomd_extra.safetensors" in json.dumps(lomds)  # from extra_model_paths.yaml


def test_lomd_from_extra_model_paths_loads(comfy):
    from tests.comfyui.graphs import apply, probe

    result = comfy.run(
        {
            **loaders(lomd="lomd_extra.safetensors"),
            "apply": apply(["unet", 0], 1.0),
            "p": probe(["apply", 0], "extra_lomd"),
        }
    )
    assert result.status == "success", result.error


def test_example_workflows_are_listed_and_served(comfy):
    templates = comfy.get("/workflow_templates")
    from tests.comfyui.workflows import ALL

    expected = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    assert expected == sorted(ALL)  # the template browser titles them with these names
    assert sorted(templates[PACK_NAME]) == expected
    for stem in expected:
        workflow = comfy.get(f"/api/workflow_templates/{PACK_NAME}/{quote(stem)}.json")
        assert workflow["nodes"], stem


def test_every_node_of_the_pack_is_in_an_example_workflow(comfy):
    """Each node a user can add is shown working in at least one template (test-only nodes aside)."""
    ours = {
        name
        for name, spec in comfy.object_info().items()
        if name.startswith("MetaLoRA") and not spec["category"].startswith("MetaLoRA/testing")
    }
    used = {
        n["type"]
        for path in (REPO / "example_workflows").glob("*.json")
        for n in json.loads(path.read_text())["nodes"]
    }
    assert ours and not ours - used, f"in no example workflow: {sorted(ours - used)}"


def test_front_end_extension_is_served(comfy):
    extensions = comfy.get("/extensions")
    ours = [e for e in extensions if e.startswith(f"/extensions/{PACK_NAME}/")]
    assert (
        f"/extensions/{PACK_NAME}/metalora.js" in ours
        and f"/extensions/{PACK_NAME}/metalora_chart.js" in ours
    )
    import urllib.request

    with urllib.request.urlopen(comfy.url + f"/extensions/{PACK_NAME}/metalora.js", timeout=30) as resp:
        assert b"registerExtension" in resp.read()


FRONT_END_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _widget_count(spec: dict) -> int:
    """Values a node's widgets_values holds: one per widget input, plus one for the control widget the front
    end adds after an input that declares control_after_generate OR is an INT named seed / noise_seed."""
    count = 0
    for section in ("required", "optional"):
        for name, value in spec["input"].get(section, {}).items():
            kind = value[0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                declared = bool(len(value) > 1 and value[1].get("control_after_generate"))
                count += 1 + int(declared or (kind == "INT" and name in ("seed", "noise_seed")))
    return count


def test_example_workflows_use_existing_nodes_with_consistent_links(comfy):
    info = comfy.object_info()
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        assert (path.with_suffix(".jpg")).is_file() and path.with_suffix(".jpg").stat().st_size < 50_000
        nodes = {n["id"]: n for n in workflow["nodes"]}
        for n in nodes.values():
            if n["type"] in FRONT_END_ONLY:
                continue
            assert n["type"] in info, f"{path.name}: unknown node {n['type']}"
            if n["type"].startswith("MetaLoRA"):
                assert len(n["widgets_values"]) == _widget_count(info[n["type"]]), (path.name, n["type"])
        for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
            assert nodes[src]["outputs"][src_slot]["type"] == kind
            assert link_id in nodes[src]["outputs"][src_slot]["links"]
            assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
            if nodes[dst]["type"] in info and kind != "*":
                spec = info[nodes[dst]["type"]]["input"]
                name = nodes[dst]["inputs"][dst_slot]["name"]
                declared = {**spec.get("required", {}), **spec.get("optional", {})}[name][0]
                assert declared in (kind, "*"), (path.name, nodes[dst]["type"], name, declared, kind)
