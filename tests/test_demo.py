"""`metalora demo`: every stage runs on the embedded default, the report holds what it claims, the printed
personalize command reproduces the identity bit for bit, and the real-weights path takes given files."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex

import pytest
import torch

from metalora_core.cli.main import main
from metalora_core.formats import load_identity
from metalora_core.sampling import flux_schedule
from metalora_core.training.objective import flux_mu

SMALL = ["--steps", "8", "--meta-steps", "4", "--images", "2", "--sample-steps", "3"]


@pytest.fixture(scope="module")
def demo_console(tmp_path_factory):
    """The demo run once, as a user sees it: (out folder, report.json, stdout, stderr)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(["demo", "--out", str(out), *SMALL]) == 0
    return out, json.loads((out / "report.json").read_text()), stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def demo(demo_console):
    return demo_console[:2]


def test_the_console_ends_with_one_plain_line_pointing_to_the_report(demo_console):
    out, _, stdout, stderr = demo_console
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("metalora demo: done in ")
    assert lines[-1].endswith(f"Open {out / 'report.html'} in a browser to see the report.")
    assert "dropped" not in stderr  # the demo draws its own identities: none is refused
    assert "None" not in stderr
    assert (
        "no R-FaceSim: no face in the 2 generated images (tiny face models find only a drawn marker" in stderr
    )
    report = json.loads(stdout.strip().splitlines()[-1])  # stdout stays one JSON line for scripts
    assert set(report["last_quarter_loss"]) == {
        "Meta-LoRA (meta-trained LoMD)", "Meta-LoRA (distilled LoMD)", "Meta-LoRA (seeded LoMD)",
        "plain LoRA (rank 16)",
    }  # fmt: skip


def test_every_score_cell_holds_a_value_or_its_reason(demo):
    out, _ = demo
    page = (out / "report.html").read_text()
    section = page[page.index("<h2>Scores (R-FaceSim)</h2>") : page.index("<h2>Export</h2>")]
    cells = re.findall(r"<td>(.*?)</td>", section)
    assert len(cells) == 6 and all(c.strip() for c in cells) and "None" not in section
    assert "not computed: none of the 2 generated images has a detectable face" in cells[0]
    assert "Why the scores are empty here" in section  # the reason, where the cells are
    assert "tiny face models find only a drawn marker" in section  # beside "no detectable face"
    assert "training loss (flow matching)" in page  # the loss chart's y axis has a title


def test_demo_runs_every_stage_and_writes_the_report(demo):
    out, report = demo
    names = [t["name"].split(":")[0] for t in report["timings"]]
    assert names[0] == "models" and names[2] == "LoMD" and names[-1].startswith("exporting")
    assert len(report["timings"]) == 9 and all(t["cpu_s"] >= 0 for t in report["timings"])
    methods = report["methods"]
    assert list(report["lomds"]) == ["meta-trained", "distilled", "seeded"]
    meta, lora = methods["Meta-LoRA (meta-trained LoMD)"], methods["plain LoRA (rank 16)"]
    assert methods["Meta-LoRA (seeded LoMD)"]["first_loss"] == pytest.approx(meta["first_loss"], rel=1e-6)
    assert len(meta["losses"]) == len(lora["losses"]) == 8
    assert meta["first_loss"] == pytest.approx(lora["first_loss"], rel=1e-6)  # paired draws, untouched model
    assert meta["losses"] != lora["losses"]
    assert len(report["images"]["identity"]) == 2 and all(c > 0 for c in report["images"]["pixel_change"])
    assert report["scores"]["total"] == 2 and report["scores"]["model"] == "tiny"
    assert (
        report["export"]["format"] == "kohya" and (out / "identity_meta-trained_lora.safetensors").is_file()
    )
    page = (out / "report.html").read_text()
    for needle in (
        "Mechanics, not quality",
        "<svg",
        "data:image/png;base64,",
        "metalora personalize",
        "CPU s",
    ):
        assert needle in page


def test_the_reported_personalize_command_reproduces_the_identity(demo, tmp_path, capsys):
    out, report = demo
    line = next(c for c in report["commands"] if c.startswith("metalora personalize"))
    args = shlex.split(line.split("   #")[0])[1:]
    again = tmp_path / "again.safetensors"
    args[args.index("--out") + 1] = str(again)
    assert main([*args, "--quiet"]) == 0
    capsys.readouterr()
    assert (
        load_identity(again).fingerprint
        == load_identity(out / "identity_meta-trained.safetensors").fingerprint
    )


def test_the_real_weights_path_takes_given_files(demo, tmp_path, capsys):
    """--flux/--vae/--conditioning/--lomd/--image: no tiny models built, no meta-training, the given LoMD."""
    out, _ = demo
    models = out / "models"
    run = tmp_path / "real"
    args = [
        "demo", "--out", str(run), "--flux", str(models / "tiny_flux.safetensors"), "--vae", str(models / "tiny_vae"),
        "--conditioning", str(models / "prompt.safetensors"), "--lomd", str(out / "lomd_meta_trained.safetensors"),
        "--image", str(out / "images" / "photo.png"), "--resolution", "128", "--no-baseline", *SMALL,
    ]  # fmt: skip
    assert main(args) == 0
    report = json.loads((run / "report.json").read_text())
    assert list(report["lomds"]) == ["given"] and not (run / "models").exists()
    assert list(report["methods"]) == ["Meta-LoRA (given LoMD)"] and "skipped" in report["scores"]
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "x"), "--flux", str(models / "tiny_flux.safetensors")]) == 2
    assert "--image" in capsys.readouterr().err
    bad = [*args[:2], str(tmp_path / "y"), *args[3:]]
    bad[bad.index("--lomd") + 1] = str(tmp_path / "missing.safetensors")
    assert main(bad) == 2 and "--lomd" in capsys.readouterr().err and not (tmp_path / "y").exists()
    no_lomd = [a for a in args if a not in ("--lomd", str(out / "lomd_meta_trained.safetensors"))]
    no_lomd[no_lomd.index("--out") + 1] = str(tmp_path / "seeded")
    assert main(no_lomd) == 0  # no LoMD given: the seeded one, said to have no prior
    report = json.loads((tmp_path / "seeded" / "report.json").read_text())
    assert list(report["lomds"]) == ["seeded"] and "no prior" in report["lomds"]["seeded"]["source"]


def test_flux_schedule_runs_from_noise_to_image_and_shifts_like_flux():
    times = flux_schedule(4, (64, 64))  # 1024 image tokens: FLUX's mu > 0 pushes towards noise
    assert times[0] == 1.0 and times[-1] == 0.0 and bool((times[1:] < times[:-1]).all())
    assert float(times[2]) > 0.5  # unshifted it would be exactly 0.5
    mid = flux_schedule(2, (64, 64))[1]  # t = 0.5 shifted: exp(mu) / (exp(mu) + 1) = sigmoid(mu)
    assert float(mid) == pytest.approx(float(torch.sigmoid(torch.tensor(flux_mu(1024)))), rel=1e-6)


def test_the_scores_section_in_a_real_browser(demo):
    """The report as a browser shows it (headless Chromium): the Scores cells render with text, no "None",
    the reason banner sits right above them; a screenshot of the section is kept beside the report."""
    import asyncio

    from tests.comfyui.browser import chromium_binary, open_page

    if chromium_binary() is None:
        pytest.skip("no chromium: install Debian's chromium (CI does)")
    pytest.importorskip("aiohttp")
    out, _ = demo
    shot = out / "scores-section.png"

    async def body(page):
        await page.wait_for("document.readyState === 'complete'")
        found = await page.evaluate(
            """(() => {
                const h = [...document.querySelectorAll('h2')].find(e => e.textContent.startsWith('Scores'));
                let banner = h.nextElementSibling, table = banner;
                while (table && table.tagName !== 'TABLE') table = table.nextElementSibling;
                h.scrollIntoView();
                return {banner: banner.innerText, cells: [...table.querySelectorAll('td')].map(td => td.innerText),
                        visible: table.getBoundingClientRect().height > 0};
            })()"""
        )
        await page.screenshot(shot)
        return found

    found = asyncio.run(open_page((out / "report.html").as_uri(), body, viewport=(1280, 900)))
    assert found["visible"] and found["banner"].startswith("Why the scores are empty here")
    assert len(found["cells"]) == 6 and all(c.strip() for c in found["cells"])
    assert not any("None" in c for c in found["cells"])
    assert shot.stat().st_size > 10_000  # a real rendering, kept beside the report for a look
