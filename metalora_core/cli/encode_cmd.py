"""``metalora encode-caption``: the training caption as a text-features file, for ``--conditioning``.

``personalize`` and ``meta-train`` encode their captions themselves when ``--flux`` is a FLUX.1 or Qwen-Image pipeline
folder (text encoders beside the transformer). Given a transformer file instead (ComfyUI's
``flux1-dev.safetensors``), they need the features precomputed: this command makes them once from any
FLUX.1 pipeline folder's text encoders (CLIP + T5) or Qwen-Image pipeline folder's (Qwen2.5-VL), with the
caption ``personalize`` would use.
"""

from __future__ import annotations

import json

from ..training.conditioning import encode_prompt, save_conditioning
from ..training.data import DEFAULT_CAPTION, caption


def run(args) -> int:
    from . import preflight
    from .personalize_cmd import device

    preflight.inputs(("--text-encoders", args.text_encoders, "dir"))
    out = preflight.output_file(args.out)
    prompt = caption(args.trigger, args.subject_class, args.caption)
    preflight.say(f"metalora encode-caption: encoding '{prompt}' with {args.text_encoders}", args.quiet)
    cond = encode_prompt(args.text_encoders, prompt, device(args.device))
    written = save_conditioning(out, cond, {"caption": prompt})
    print(json.dumps({"written": str(written), "caption": prompt, "tokens": int(cond.context.shape[0])}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "encode-caption",
        help="write the training caption's text features (for --conditioning) with the model's text encoders",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument(
        "--text-encoders",
        required=True,
        help="a FLUX.1 pipeline folder holding text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, or a "
        "Qwen-Image one holding text_encoder/ (Qwen2.5-VL) and tokenizer/",
    )
    p.add_argument("--out", required=True, help="features file to write (.safetensors)")
    p.add_argument("--trigger", default="ohwx", help="trigger word, as in personalize")
    p.add_argument("--class", dest="subject_class", default="person", help="class word, as in personalize")
    p.add_argument("--caption", default=DEFAULT_CAPTION, help="caption template, as in personalize")
    p.add_argument("--device", default="cpu", help="where the text encoders run")
    p.add_argument("--quiet", action="store_true", help="no status line")
    p.set_defaults(func=run)
