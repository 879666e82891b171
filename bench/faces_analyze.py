"""Time FaceAnalyzer.analyze on insightface's t1.jpg: face found at 640 px, faceless (all sizes), cached.

Usage: python bench/faces_analyze.py [--root DIR --name NAME]   (default: tiny models built in a temp folder)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import insightface  # noqa: E402

from metalora_core.dev.tiny_faces import paint_markers, write_tiny_face_models  # noqa: E402
from metalora_core.faces import load_analyzer, load_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", help="models root with insightface/models/<name>/ (default: tiny models)")
    parser.add_argument("--name", default="tiny")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp()
    if not args.root:
        write_tiny_face_models(root, args.name)
    analyzer = load_analyzer(root, args.name)
    t1 = load_image(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"))
    face = paint_markers(t1, [((320, 128), 128)]) if not args.root else t1

    def timed(image, runs):
        analyzer.analyze(image)  # warm-up (sessions per detector size are built lazily)
        start = time.perf_counter()
        for _ in range(runs):
            analyzer.clear_cache()
            analyzer.analyze(image)
        return (time.perf_counter() - start) / runs * 1000

    print(f"providers: {analyzer.model.providers}")
    print(f"face found at 640 px: {timed(face, args.runs):.1f} ms")
    if not args.root:
        print(f"no face (all {len(analyzer.det_sizes)} sizes): {timed(t1, max(1, args.runs // 3)):.1f} ms")
    analyzer.analyze(face)
    start = time.perf_counter()
    analyzer.analyze(face)
    print(f"cached: {(time.perf_counter() - start) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
