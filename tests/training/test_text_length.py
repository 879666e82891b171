"""The T5 length training encodes: ComfyUI's (at least 256 tokens, a prompt's own length beyond), capped at
FLUX.1-dev's 512, never padded to 512 (bench/text_length.py measures what each length costs)."""

from __future__ import annotations

import pytest

from metalora_core.cli.main import main
from metalora_core.training.conditioning import T5_MAX_TOKENS, T5_MIN_TOKENS, encode_prompt


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("textlen") / "pipe"
    assert main(["dev", "tiny-pipeline", "--out", str(out)]) == 0
    return out


def test_short_captions_get_comfyuis_256_tokens(pipe, capsys):
    capsys.readouterr()
    cond = encode_prompt(pipe, "photo of ohwx person")
    assert (T5_MIN_TOKENS, T5_MAX_TOKENS) == (256, 512)
    assert cond.context.shape[0] == 256 and cond.pooled is not None


def test_long_prompts_keep_their_length_up_to_512(pipe):
    words = 300
    cond = encode_prompt(pipe, " ".join(["person"] * words))
    assert words <= cond.context.shape[0] <= words + 1  # the words (+ an end token), no padding
    assert encode_prompt(pipe, " ".join(["person"] * 900)).context.shape[0] == 512
