"""Saved files honour the umask (mkstemp alone would make every LoMD / identity / LoRA mode 0600)."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
import torch

from metalora_core.cli.main import main
from metalora_core.safeio import current_umask, save_tensors


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_0666_minus_the_umask(tmp_path, mask, expected):
    with umask(mask):
        assert current_umask() == mask
        path = save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)}, {"format": "t"})
    assert _mode(path) == expected


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "a.safetensors"
    with umask(0o022):
        save_tensors(path, {"x": torch.zeros(2)}, {})
        os.chmod(path, 0o640)
        save_tensors(path, {"x": torch.ones(2)}, {})
    assert _mode(path) == 0o640


def test_every_cli_file_is_readable_by_others_under_umask_022(tmp_path, capsys):
    """The files a user hands to ComfyUI: a LoMD, an identity and the exported LoRA."""
    flux, lomd, ident = (
        str(tmp_path / n) for n in ("flux.safetensors", "lomd.safetensors", "id.safetensors")
    )
    lora = str(tmp_path / "loras" / "me.safetensors")
    with umask(0o022):
        assert main(["dev", "tiny-flux", "--out", flux]) == 0
        assert main(["dev", "random-lomd", "--model", flux, "--out", lomd]) == 0
        assert main(["dev", "random-adapter", "--lomd", lomd, "--model", flux, "--out", ident]) == 0
        assert main(["export", "--lomd", lomd, "--adapter", ident, "--out", lora]) == 0
    capsys.readouterr()
    for path in (flux, lomd, ident, lora):
        assert _mode(path) == 0o644, path
    assert _mode(tmp_path / "loras") == 0o755
