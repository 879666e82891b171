"""Entry point of the ``metalora`` command: builds the parser from the command modules, turns
:class:`MetaLoRAError` into a one-line message and a non-zero exit code (no traceback for users)."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import MetaLoRAError

# Modules under metalora_core.cli that define ``register(subparsers)``; each adds its own sub-commands.
# A module may also define ``register_dev(dev_subparsers)`` to add builders to the ``metalora dev`` group.
# In the order of the work (``metalora --help`` lists them so): try it, make a LoMD, personalize, export,
# score, inspect; then the larger jobs; the test-asset builders (``dev``) last.
COMMAND_MODULES = (
    "demo_cmd",
    "lomd_cmd",
    "encode_cmd",
    "personalize_cmd",
    "export_cmd",
    "score_cmd",
    "inspect_cmd",
    "meta_cmd",
    "lora_cmd",
    "dev_cmd",
)
EXIT_USER_ERROR = 2


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option's help that does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "default" not in text.lower()
            and not any(default is v for v in (None, False, argparse.SUPPRESS))
            and not isinstance(action, argparse._VersionAction)
        ):
            text += " (default: %(default)s)"
        return text


def all_parsers(parser: argparse.ArgumentParser):
    """``parser`` and every sub-command's parser under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from all_parsers(child)


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
    for each in all_parsers(parser):
        each.formatter_class = DefaultsHelpFormatter
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
        print(
            f"metalora {args.command}: interrupted; the result was not written (checkpoints written before "
            "the interrupt stay, to continue with --resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
