"""Which files of ``models/loras`` the Distill node reads: a folder filter, then an optional list.

Free of ComfyUI imports so it is tested on its own. Names are as ComfyUI lists them (relative to a loras
root, '/' between folders). Only .safetensors files are read (nothing is ever unpickled).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from ...metalora_core.errors import MetaLoRAError

ALL = "(all LoRAs)"


def subfolders(names: list[str]) -> list[str]:
    """``[ALL, "people", "people/actors", ...]``: every folder that holds a listed LoRA, for the combo."""
    found: set[str] = set()
    for name in names:
        parts = name.replace("\\", "/").split("/")[:-1]
        found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return [ALL, *sorted(found)]


def select_loras(names: list[str], folder: str, lines: str) -> list[str]:
    """The chosen names, sorted: those under ``folder`` and, if ``lines`` has any, matching one of them.

    A line is a name or a ``*``/``?`` pattern, relative to the loras root (``people/anna.safetensors``,
    ``people/*``); '#' starts a comment. A line that matches nothing is an error naming it (a typo must not
    silently shrink the set), as is an empty selection.
    """
    norm = {n.replace("\\", "/"): n for n in names}
    prefix = "" if folder in ("", ALL) else folder.rstrip("/") + "/"
    pool = sorted(n for n in norm if n.startswith(prefix) and n.lower().endswith(".safetensors"))
    patterns = [ln.split("#", 1)[0].strip().replace("\\", "/") for ln in lines.splitlines()]
    patterns = [p for p in patterns if p]
    where = f"folder '{folder}'" if prefix else "models/loras"
    if not patterns:
        chosen = pool
    else:
        chosen = []
        for pattern in patterns:
            hits = [
                n
                for n in pool
                if n == pattern or fnmatchcase(n, pattern) or fnmatchcase(n, pattern + ".safetensors")
            ]
            if not hits:
                raise MetaLoRAError(
                    f"loras list: '{pattern}' matches no .safetensors LoRA in {where} "
                    "(names are relative to models/loras, e.g. people/anna.safetensors or people/*)"
                )
            chosen += [n for n in hits if n not in chosen]
    if not chosen:
        raise MetaLoRAError(f"no .safetensors LoRA in {where}; put the person LoRAs there and refresh")
    return [norm[n] for n in sorted(chosen)]
