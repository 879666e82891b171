"""GGUF copies of the tiny FLUX, written the way ComfyUI-GGUF's ``tools/convert.py`` writes FLUX (test-only).

Same rules as that tool: 1-D tensors and tensors of at most 1024 values stay F32; every other weight gets the
requested type (F16, Q8_0 or Q4_0, which gguf-py can quantize; it cannot make K-quants), falling back to F16
where the type cannot hold the shape. ComfyUI-GGUF's ``UnetLoaderGGUF`` then loads it as it loads a real one.
"""

from __future__ import annotations

from pathlib import Path

QUANTIZATION_THRESHOLD = 1024  # convert.py: tensors this small stay F32
TYPES = ("F16", "Q8_0", "Q4_0")


def write_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """``src`` (a BFL-format FLUX .safetensors) as a GGUF file at ``dst`` with weights of type ``qtype``."""
    import gguf
    from safetensors.torch import load_file

    wanted = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, tensor in load_file(str(src)).items():
        data = tensor.float().numpy()
        kind = wanted
        if data.ndim == 1 or data.size <= QUANTIZATION_THRESHOLD:
            kind = gguf.GGMLQuantizationType.F32
        try:
            packed = gguf.quants.quantize(data, kind)
        except (AttributeError, gguf.QuantError):
            kind = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, kind)
        writer.add_tensor(key, packed, raw_dtype=kind)
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=dst)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
