"""The Distill node's choice of LoRA files: folder filter, list with wildcards, clear errors."""

from __future__ import annotations

import pytest

NAMES = ["a.safetensors", "people/anna.safetensors", "people/bob.safetensors", "people/old/x.safetensors",
         "styles/ink.safetensors", "people/legacy.pt"]  # fmt: skip


@pytest.fixture
def sel(pack_module):
    return pack_module("nodes.comfy_folders.lora_selection")


def test_folders_offered(sel):
    assert sel.subfolders(NAMES) == [sel.ALL, "people", "people/old", "styles"]


def test_folder_filter_and_list(sel):
    assert sel.select_loras(NAMES, "people", "") == [
        "people/anna.safetensors", "people/bob.safetensors", "people/old/x.safetensors"
    ]  # fmt: skip
    assert sel.select_loras(NAMES, sel.ALL, "people/*.safetensors\n# comment\na") == [
        "a.safetensors", "people/anna.safetensors", "people/bob.safetensors", "people/old/x.safetensors"
    ]  # fmt: skip
    assert sel.select_loras(NAMES, "people", "people/bob") == ["people/bob.safetensors"]


def test_unmatched_line_and_empty_selection_are_named(sel, pack_module):
    MetaLoRAError = pack_module("metalora_core.errors").MetaLoRAError
    with pytest.raises(MetaLoRAError, match="'people/carol' matches no"):
        sel.select_loras(NAMES, sel.ALL, "people/anna.safetensors\npeople/carol")
    with pytest.raises(MetaLoRAError, match="matches no"):
        sel.select_loras(NAMES, sel.ALL, "people/legacy.pt")  # never unpickled
    with pytest.raises(MetaLoRAError, match="no .safetensors LoRA in folder 'empty'"):
        sel.select_loras(NAMES, "empty", "")
