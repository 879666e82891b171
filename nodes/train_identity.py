"""MetaLoRATrainIdentity: personalize FLUX.1 or Qwen-Image to one photo inside the graph, on the model
ComfyUI loaded.

A thin node: it turns the inputs into training views (metalora_core's augmentation pipeline), encodes them
once with the graph's VAE, and runs metalora_core's ``personalize`` with the backend of the MODEL's family
(:func:`.comfy_training.families.make_backend`).
Progress goes to ComfyUI's progress bar and to the ``metalora.train_progress`` event (the live loss chart);
the Cancel button stops training before the next step and leaves nothing behind.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.utils
import numpy as np
import torch
from comfy_api.latest import io

from ..metalora_core.errors import MetaLoRAError
from ..metalora_core.faces import face_box
from ..metalora_core.training.memory import activation_bytes
from ..metalora_core.training.personalize import PersonalizeConfig, personalize
from ..metalora_core.training.protocol import Progress, TrainingCancelled
from ..metalora_core.training.schedules import SCHEDULES, capped_warmup
from .comfy_folders.model_folders import face_models
from .comfy_training.families import make_backend
from .comfy_training.glue import (
    PROGRESS_EVENT,
    check_vae_latents,
    encode_views,
    eta_text,
    image_latents,
    loss_map,
    progress_event,
    text_conditioning,
    training_views,
)
from .faces import analyzer_for
from .types import CATEGORY, IdentityType, LoMDType, fixed_seed_input

LOG = logging.getLogger("metalora")
DEFAULTS = PersonalizeConfig()

NO_FACE_MODEL = "none"
LossMapType = io.Custom("LOSS_MAP")


def _send_progress(node_id: str | None, progress: Progress) -> None:
    try:
        from server import PromptServer
    except ImportError:  # not inside a running ComfyUI server (e.g. a script)
        return
    if getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_sync(PROGRESS_EVENT, progress_event(node_id, progress))


def _photo(image: torch.Tensor) -> np.ndarray:
    """The single photo of an IMAGE batch as uint8 (H, W, 3)."""
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise MetaLoRAError(f"image input: expected a ComfyUI IMAGE (B, H, W, 3), got {tuple(image.shape)}")
    if image.shape[0] != 1:
        raise MetaLoRAError(
            f"image input holds {image.shape[0]} images; Meta-LoRA personalizes from ONE photo "
            "(pick one, e.g. with Image From Batch)"
        )
    return (image[0, ..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


class MetaLoRATrainIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRATrainIdentity",
            display_name="Meta-LoRA Train Identity",
            category=f"{CATEGORY}/training",
            description=(
                "Personalizes FLUX.1 or Qwen-Image to the person in ONE photo: trains a Meta-LoRA identity (Mid + Up layers "
                "on the frozen LoMD) for a few hundred steps on the model ComfyUI already loaded (fp8, GGUF "
                "and low-VRAM offloading keep working). The incoming MODEL is never changed; Cancel stops it "
                "before the next step. Connect the identity to Meta-LoRA Apply, the loss to Plot Loss Graph."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The FLUX.1 or Qwen-Image model to personalize (e.g. flux1-dev or qwen_image from Load Diffusion Model). It is not modified.",
                ),
                io.Vae.Input(
                    "vae",
                    tooltip="The model's VAE (FLUX: ae.safetensors, Qwen-Image: qwen_image_vae.safetensors); encodes the training views once before training.",
                ),
                io.Conditioning.Input(
                    "positive",
                    tooltip="The training caption from your CLIP Text Encode, with the trigger word (e.g. 'a photo of sks person'). Use the same trigger word when generating.",
                ),
                io.Image.Input("image", tooltip="ONE photo of the person (face clearly visible)."),
                LoMDType.Input(
                    "lomd",
                    tooltip="The shared Meta-Down (LoMD) from Meta-LoRA Load LoMD; the identity only works with this LoMD.",
                ),
                io.Int.Input(
                    "steps",
                    default=DEFAULTS.steps,
                    min=1,
                    max=10000,
                    tooltip="Optimizer steps. 375 is the paper's setting for one photo.",
                ),
                io.Float.Input(
                    "lr_mid",
                    default=DEFAULTS.lr,
                    min=0.0,
                    max=0.1,
                    step=1e-5,
                    round=1e-6,
                    tooltip="Learning rate of the Mid (LoM) layers (AdamW).",
                ),
                io.Float.Input(
                    "lr_up",
                    default=DEFAULTS.lr,
                    min=0.0,
                    max=0.1,
                    step=1e-5,
                    round=1e-6,
                    tooltip="Learning rate of the Up (LoU) layers (AdamW); Up starts at zero.",
                ),
                io.Int.Input(
                    "rank_mid",
                    default=0,
                    min=0,
                    max=256,
                    tooltip="Rank of the per-identity Mid layer; 0 uses the LoMD's own default (16 in the paper).",
                ),
                fixed_seed_input(
                    "Seed of the augmentations, timesteps, noise and Mid init: same seed, same identity. "
                    "Stays fixed after each run, so queueing again reuses the trained identity."
                ),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=256,
                    max=2048,
                    step=64,
                    tooltip="Training resolution (pixels of a square side; buckets keep this pixel budget).",
                ),
                io.Boolean.Input(
                    "bucketing",
                    default=True,
                    tooltip="On: train at the photo's aspect ratio (nearest bucket). Off: square crops.",
                ),
                io.Int.Input(
                    "views",
                    default=16,
                    min=1,
                    max=256,
                    tooltip="How many augmented views of the photo to encode and train on.",
                ),
                io.Float.Input(
                    "augmentation",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Strength of the augmentations (crops, flips, colour, blur); 0 trains on the photo as it is.",
                ),
                io.Combo.Input(
                    "schedule",
                    options=list(SCHEDULES),
                    default=DEFAULTS.schedule,
                    tooltip="Learning-rate schedule after the warm-up.",
                ),
                io.Int.Input(
                    "warmup_steps",
                    default=DEFAULTS.warmup_steps,
                    min=0,
                    max=5000,
                    tooltip="Linear learning-rate warm-up steps.",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute each block in backward: several times less activation memory (and offloaded weights are not kept for backward) for ~30% more time.",
                ),
                io.Combo.Input(
                    "face_model",
                    options=[NO_FACE_MODEL, *face_models()],
                    default=NO_FACE_MODEL,
                    optional=True,
                    tooltip="Optional insightface model (models/insightface/models/<name>/): every training crop then keeps the whole face, and the loss weighs the face twice. 'none': plain crops.",
                ),
            ],
            outputs=[
                IdentityType.Output(
                    display_name="identity",
                    tooltip="The trained identity adapter (Mid + Up); apply it with Meta-LoRA Apply or save it.",
                ),
                LossMapType.Output(
                    display_name="loss", tooltip="Loss per step, for ComfyUI's Plot Loss Graph node."
                ),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        vae,
        positive,
        image,
        lomd,
        steps,
        lr_mid,
        lr_up,
        rank_mid,
        seed,
        resolution,
        bucketing,
        views,
        augmentation,
        schedule,
        warmup_steps,
        gradient_checkpointing,
        face_model=NO_FACE_MODEL,
    ) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        photo = _photo(image)
        box = None
        if face_model and face_model != NO_FACE_MODEL:
            box = face_box(photo, analyzer_for(face_model))
            if box is None:
                raise MetaLoRAError(
                    f"image input: face model '{face_model}' finds no face in the photo; use a photo where the "
                    "face is clearly visible, or set face_model to 'none'"
                )
        with torch.inference_mode(False), torch.enable_grad():
            backend = make_backend(model)
            cond = text_conditioning(positive, backend.dims)
            pixels, weights = training_views(photo, views, resolution, bucketing, augmentation, seed, box)
            with torch.no_grad():  # encoded once, in the model's latent space (as KSampler sees latents)
                encoded = encode_views(vae, pixels).float()
                check_vae_latents(encoded, model.model.latent_format.latent_dimensions, backend.dims)
                latents = image_latents(model.model.process_latent_in(encoded).float().cpu())
            backend.memory_required = activation_bytes(
                backend.dims,
                tuple(latents.shape[-2:]),
                cond.context.shape[0],
                1,
                backend.dtype,
                gradient_checkpointing,
            )
            config = PersonalizeConfig(
                steps=steps,
                lr=lr_mid,
                lr_mid=lr_mid,
                lr_up=lr_up,
                schedule=schedule,
                warmup_steps=warmup_steps,
                gradient_checkpointing=gradient_checkpointing,
                seed=seed,
                rank_mid=rank_mid or None,
                extra={
                    "trainer": "comfyui",
                    "resolution": resolution,
                    "bucketing": bucketing,
                    "views": views,
                    "augmentation": augmentation,
                    "view_size": [int(pixels.shape[2]), int(pixels.shape[1])],
                    "face_model": face_model if box is not None else None,
                },
            )
            _, warmup_note = capped_warmup(steps, warmup_steps)
            if warmup_note:
                LOG.warning("Meta-LoRA: %s", warmup_note)
            bar = comfy.utils.ProgressBar(steps, node_id=node_id)

            def on_progress(p: Progress) -> None:
                bar.update_absolute(p.step, p.total)
                _send_progress(node_id, p)
                if p.step == 1 or p.step == p.total or p.step % 25 == 0:
                    LOG.info(
                        "Meta-LoRA step %d/%d loss %.4f lr %.2e eta %s",
                        p.step,
                        p.total,
                        p.loss,
                        p.lr,
                        eta_text(p.eta_s),
                    )

            try:
                with backend.session():
                    result = personalize(
                        backend,
                        lomd,
                        [x for x in latents],
                        cond,
                        config,
                        on_progress=on_progress,
                        should_cancel=comfy.model_management.processing_interrupted,
                        weights=weights,
                    )
            except TrainingCancelled:
                comfy.model_management.throw_exception_if_processing_interrupted()
                raise comfy.model_management.InterruptProcessingException() from None
        return io.NodeOutput(result.adapter, loss_map(result.losses))
