"""Save / Load identity in a real ComfyUI: atomic save with metadata kept, listed by the loader, same model."""

from __future__ import annotations

import uuid

import torch

from metalora_core.formats import load_identity
from tests.comfyui.graphs import apply, export_graph, loaders, probe, probe_output
from tests.comfyui.harness import node


def test_save_then_load_identity_round_trip(comfy, comfy_base):
    name = f"saved_{uuid.uuid4().hex[:8]}"
    saved = comfy.run(
        {
            "identity": node("MetaLoRALoadIdentity", identity_name="identity.safetensors"),
            "save": node(
                "MetaLoRASaveIdentity",
                identity=["identity", 0],
                filename=name,
                destination="models/metalora",
                overwrite=False,
            ),
            "save_out": node(
                "MetaLoRASaveIdentity",
                identity=["identity", 0],
                filename=f"ids/{name}",
                destination="output",
                overwrite=False,
            ),
        }
    )
    assert saved.status == "success", saved.error
    path = comfy_base / "models" / "metalora" / f"{name}.safetensors"
    original = load_identity(comfy_base / "models" / "metalora" / "identity.safetensors")
    for copy in (load_identity(path), load_identity(comfy_base / "output" / "ids" / f"{name}.safetensors")):
        assert copy.fingerprint == original.fingerprint
        assert copy.lomd_fingerprint == original.lomd_fingerprint and copy.training == original.training
    assert not list(path.parent.glob(f".{name}*.tmp"))  # no temporary file left behind
    listed = comfy.object_info("MetaLoRALoadIdentity")["MetaLoRALoadIdentity"]["input"]["required"][
        "identity_name"
    ]
    assert f"{name}.safetensors" in str(listed)

    t_orig, t_copy = f"orig_{name}", f"copy_{name}"
    graph = {
        **loaders(),
        "copy": node("MetaLoRALoadIdentity", identity_name=f"{name}.safetensors"),
        "a_orig": apply(["unet", 0], 1.0),
        "a_copy": apply(["unet", 0], 1.0, identity="copy"),
        "p_orig": probe(["a_orig", 0], t_orig),
        "p_copy": probe(["a_copy", 0], t_copy),
    }
    result = comfy.run(graph)
    assert result.status == "success", result.error
    assert torch.equal(probe_output(comfy_base, t_orig), probe_output(comfy_base, t_copy))


def test_unsafe_filename_is_refused(comfy):
    result = comfy.run(
        {
            "identity": node("MetaLoRALoadIdentity", identity_name="identity.safetensors"),
            "save": node(
                "MetaLoRASaveIdentity",
                identity=["identity", 0],
                filename="../escape",
                destination="output",
                overwrite=True,
            ),
        }
    )
    assert result.status == "error" and "not allowed" in result.error["exception_message"]


def test_broken_lomd_file_is_a_clear_node_error(comfy):
    result = comfy.run(export_graph("never_written", 1.0, "fp32", lomd="lomd_broken.safetensors"))
    assert result.status == "error" and result.error["node_type"] == "MetaLoRALoadLoMD"
    assert "lomd_broken.safetensors" in result.error["exception_message"]
    assert "not a readable safetensors file" in result.error["exception_message"]
