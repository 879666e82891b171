"""Entry point of the ``metalora`` command: builds the parser from the command modules, turns
:class:`MetaLoRAError` into a one-line message and a non-zero exit code (no traceback for users)."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import MetaLoRAError

# Modules under metalora_core.cli that define ``register(subparsers)``; each adds its own sub-commands.
# A module may also define ``register_dev(dev_subparsers)`` to add builders to the ``metalora dev`` group.
COMMAND_MODULES = (
    "inspect_cmd",
    "export_cmd",
    "dev_cmd",
    "score_cmd",
    "personalize_cmd",
    "meta_cmd",
    "lomd_cmd",
    "lora_cmd",
)
EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalora",
        description="Meta-LoRA for FLUX.1: one-photo identity personalization (arXiv 2503.22352).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [importlib.import_module(f"{__package__}.{name}") for name in COMMAND_MODULES]
    registered = {name: module.register(sub) for name, module in zip(COMMAND_MODULES, modules)}
    dev_sub = registered["dev_cmd"]  # the `dev` group: any command module may add test-asset builders to it
    for module in modules:
        if hasattr(module, "register_dev"):
            module.register_dev(dev_sub)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MetaLoRAError as exc:
        print(f"metalora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"metalora {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
