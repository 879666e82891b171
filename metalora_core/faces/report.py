"""The readable text table of a :class:`FaceSimResult` (CLI output and the node's text output)."""

from __future__ import annotations


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_report(result) -> str:
    """Per-image table, then the summary lines: score, percentage, verdict, failures, gap, diversity."""
    psnrs = result.extras.get("psnr_ref")
    ssims = result.extras.get("ssim_ref")
    width = max([len("image")] + [len(im.name) for im in result.images])
    head = f"{'image'.ljust(width)}  {'R-FaceSim':>9}  {'FaceSim(ref)':>12}"
    head += f"  {'PSNR(ref)':>9}  {'SSIM(ref)':>9}" if psnrs else ""
    lines = [head, "-" * len(head)]
    for i, im in enumerate(result.images):
        row = f"{im.name.ljust(width)}  {_f(im.r_facesim):>9}  {_f(im.facesim_ref):>12}"
        if psnrs:
            row += f"  {_f(psnrs[i], 2):>9}  {_f(ssims[i]):>9}"
        if not im.face:
            row += f"  NO FACE ({im.note})" if im.note and im.note != "no face" else "  NO FACE"
        elif im.note:
            row += f"  ({im.note})"
        lines.append(row)
    lines.append("-" * len(head))
    pct = f"{result.percent:.1f} %" if result.percent is not None else "-"
    lines += [
        f"R-FaceSim           {_f(result.score)}  ({pct}; 50 % = same-person threshold {result.threshold:.2f}"
        f" for {result.model}) -> {result.verdict}",
        f"with failures as 0  {_f(result.score_with_failures)}",
        f"no face             {result.no_face} of {result.total} ({100 * result.no_face_rate:.1f} %)",
        f"FaceSim(reference)  {_f(result.facesim_ref)}   copy gap (ref - R) {_f(result.copy_gap)}",
        f"references used     {len(result.references_used)}"
        + (f"; excluded: {', '.join(result.references_excluded)}" if result.references_excluded else ""),
    ]
    div = result.diversity
    if div is not None:
        lines.append(
            f"diversity           face {_f(div.face_distance)}  pixel {_f(div.pixel_distance)}"
            + ("  FEATURE COLLAPSE" if div.collapse else "")
        )
    for key in ("clip_t", "clip_i", "clip_i_ref", "dino", "dino_ref"):
        if key in result.extras:
            lines.append(f"{key.upper().replace('_', '-'):<19} {_f(result.extras[key])}")
    for key, why in result.extras.get("skipped", {}).items():
        lines.append(f"{key.upper().replace('_', '-'):<19} skipped: {why}")
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)
