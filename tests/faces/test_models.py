"""Model-folder validation: every layout mistake gives an error naming the folder/file and the fix."""

from __future__ import annotations

import shutil

import pytest

from metalora_core.errors import MetaLoRAError
from metalora_core.faces import load_face_model, validate_model
from metalora_core.faces import models as models_mod


@pytest.fixture
def tiny_folder(face_root):
    return face_root / "insightface" / "models" / "tiny"


def _copy(tiny_folder, dest, files=None):
    dest.mkdir(parents=True, exist_ok=True)
    for f in files or sorted(tiny_folder.glob("*.onnx")):
        shutil.copy(tiny_folder / f if isinstance(f, str) else f, dest)
    return dest


def test_valid_layouts(tmp_path, tiny_folder):
    layout = validate_model(tiny_folder.parents[2], "tiny")
    assert layout.detector.name == "det_tiny.onnx" and layout.recognizer.name == "w600k_tiny.onnx"
    _copy(tiny_folder, tmp_path / "models" / "mine")  # insightface's own ~/.insightface/models/<name>
    assert validate_model(tmp_path, "mine").folder == (tmp_path / "models" / "mine").resolve()
    assert validate_model("/nonexistent", str(tiny_folder)).folder == tiny_folder.resolve()  # a folder path


def test_missing_folder_names_expected_path_and_lists_others(tmp_path, tiny_folder):
    _copy(tiny_folder, tmp_path / "insightface" / "models" / "buffalo_l")
    with pytest.raises(MetaLoRAError) as err:
        validate_model(tmp_path, "antelopev2")
    msg = str(err.value)
    assert str(tmp_path / "insightface" / "models" / "antelopev2") in msg
    assert "buffalo_l" in msg and "glintr100.onnx" in msg and "Nothing is downloaded" in msg


def test_missing_root(tmp_path):
    with pytest.raises(MetaLoRAError, match="does not exist"):
        validate_model(tmp_path / "nope", "antelopev2")


def test_nested_folder_is_explained(tmp_path, tiny_folder):
    _copy(tiny_folder, tmp_path / "insightface" / "models" / "antelopev2" / "antelopev2")
    with pytest.raises(MetaLoRAError) as err:
        validate_model(tmp_path, "antelopev2")
    msg = str(err.value)
    assert "nested" in msg and "assert 'detection' in self.models" in msg
    assert str(tmp_path / "insightface" / "models" / "antelopev2" / "antelopev2") in msg
    assert "det_tiny.onnx" in msg


def test_zip_not_unpacked(tmp_path):
    (tmp_path / "insightface" / "models").mkdir(parents=True)
    (tmp_path / "insightface" / "models" / "antelopev2.zip").write_bytes(b"PK")
    with pytest.raises(MetaLoRAError, match="still zipped"):
        validate_model(tmp_path, "antelopev2")


def test_no_detector_and_no_recognizer(tmp_path, tiny_folder):
    _copy(tiny_folder, tmp_path / "insightface" / "models" / "r", [tiny_folder / "w600k_tiny.onnx"])
    with pytest.raises(MetaLoRAError, match="no face detector.*w600k_tiny.onnx"):
        validate_model(tmp_path, "r")
    _copy(tiny_folder, tmp_path / "insightface" / "models" / "d", [tiny_folder / "det_tiny.onnx"])
    with pytest.raises(MetaLoRAError, match="no face recognizer.*det_tiny.onnx"):
        validate_model(tmp_path, "d")
    (tmp_path / "insightface" / "models" / "e").mkdir()
    with pytest.raises(MetaLoRAError, match="holds no .onnx file"):
        validate_model(tmp_path, "e")


@pytest.mark.parametrize("content", [b"", b"this is not a protobuf \xff\xfe" * 10, "truncate"])
def test_corrupt_onnx_names_the_file(tmp_path, tiny_folder, content):
    folder = _copy(tiny_folder, tmp_path / "insightface" / "models" / "bad")
    bad = folder / "w600k_tiny.onnx"
    bad.write_bytes(bad.read_bytes()[:500] if content == "truncate" else content)
    with pytest.raises(MetaLoRAError) as err:
        validate_model(tmp_path, "bad")
    assert str(bad) in str(err.value)


def test_never_downloads_and_validates_before_loading(tmp_path, tiny_folder, monkeypatch):
    import insightface.app.face_analysis as fa

    def boom(*args, **kwargs):
        raise AssertionError("insightface tried to download")

    monkeypatch.setattr(fa, "ensure_available", boom)
    calls = []
    real = fa.FaceAnalysis
    monkeypatch.setattr(fa, "FaceAnalysis", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(MetaLoRAError):
        load_face_model(tmp_path, "antelopev2")
    assert calls == []  # the folder check failed before insightface was touched
    models_mod._LOADED.clear()
    model = load_face_model(tiny_folder.parents[2], "tiny", ["CPUExecutionProvider"])
    assert type(model.detector).__name__ == "SCRFD" and type(model.recognizer).__name__ == "ArcFaceONNX"
    assert load_face_model(tiny_folder.parents[2], "tiny", ["CPUExecutionProvider"]) is model  # cached


def test_default_providers_prefers_cuda(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert models_mod.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert models_mod.default_providers() == ["CPUExecutionProvider"]
