"""MetaLoRAApply: MODEL + LoMD + identity + strength -> a patched clone of MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from .comfy_model.model_shapes import model_target_shapes
from .comfy_model.patch_plan import check_fits, patch_tensors
from .comfy_model.weight_adapter import MetaLoRAWeightAdapter
from .types import CATEGORY, IdentityType, LoMDType, strength_input


def apply_identity(model, lomd, identity, strength: float, force: bool = False):
    """A clone of ``model`` with one weight patch per identity layer; ``model`` itself is never changed."""
    check_fits(lomd, identity, model_target_shapes(model), force)
    patched = model.clone()
    if strength == 0.0:
        return patched
    patches = {
        key: MetaLoRAWeightAdapter({key}, weights) for key, weights in patch_tensors(lomd, identity).items()
    }
    added = patched.add_patches(patches, strength_patch=strength)
    missing = sorted(set(patches) - set(added))
    if missing:  # check_fits saw these keys; a model that hides them cannot be patched
        raise RuntimeError(f"ComfyUI refused the weight patch for {missing[0]}")
    return patched


class MetaLoRAApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAApply",
            display_name="Apply Meta-LoRA Identity",
            category=f"{CATEGORY}/apply",
            description=(
                "Puts a personalized identity into a FLUX.1 or Qwen-Image model: adds strength * Up @ Mid @ Down to each "
                "targeted weight through ComfyUI's own weight patching (works with fp8, GGUF and low-VRAM "
                "offloading). Returns a patched copy; the incoming MODEL is unchanged and removing this node "
                "leaves no trace. Several Apply nodes can be chained."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The FLUX.1 or Qwen-Image diffusion model (e.g. from Load Diffusion Model).",
                ),
                LoMDType.Input(
                    "lomd", tooltip="The LoMD the identity was trained with (Load Meta-LoRA LoMD)."
                ),
                IdentityType.Input("identity", tooltip="The identity adapter (from Train or Load Identity)."),
                strength_input(
                    "How strongly to apply the identity: 1 = as trained, 0 = off, negative values "
                    "push away from it."
                ),
                io.Boolean.Input(
                    "allow_other_lomd",
                    default=False,
                    optional=True,
                    advanced=True,
                    tooltip="Use the identity even though it was trained against a different LoMD "
                    "(fingerprints differ). The result will not be what the identity learned.",
                ),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A patched copy of the model.")],
        )

    @classmethod
    def execute(cls, model, lomd, identity, strength, allow_other_lomd=False) -> io.NodeOutput:
        return io.NodeOutput(apply_identity(model, lomd, identity, float(strength), bool(allow_other_lomd)))
