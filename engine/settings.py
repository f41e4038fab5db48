"""Every setting of a dreamfleet run in one typed, flat namespace, named after diffusers' train_dreambooth flags.

The same names are used in the YAML `--config` file, in a manifest's `params` column (per-subject overrides) and in
`run.json`. A setting left unset takes the default of the base model's preset: real models get the DreamBooth
literature's values, the `tiny` models small ones so a CPU finishes in minutes. Explicit settings always win.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SettingsError(ValueError):
    """A setting is unknown, of the wrong type or out of range; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    # Which family of defaults fills unset values; set from --base-model ("tiny" for the tiny models).
    preset: Literal["standard", "tiny"] = "standard"

    # Fine-tuning
    mode: Literal["lora", "full"] = "lora"
    max_train_steps: int = Field(800, ge=1)
    learning_rate: float | None = Field(None, gt=0, le=1.0)  # None: by mode and preset, see DEFAULT_LEARNING_RATES
    train_text_encoder: bool = False
    lora_rank: int = Field(4, ge=1, le=1024)
    lora_alpha: float | None = Field(None, gt=0)  # None: equal to lora_rank, as diffusers' scripts do
    # None: the base family's (UNet: to_k/to_q/to_v/to_out.0; FLUX: attention and feed-forward layers of both kinds
    # of block, as diffusers' FLUX scripts target; see engine/diffusion/unet.py and flux.py)
    lora_target_modules: list[str] | None = None
    text_encoder_lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    max_grad_norm: float = Field(1.0, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    use_8bit_adam: bool = True  # only takes effect where bitsandbytes and CUDA are both present
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None: bf16 on GPU, no on CPU
    checkpointing_steps: int = Field(200, ge=1)
    checkpoints_total_limit: int = Field(2, ge=1)
    # Flow-matching bases (FLUX): where training draws sigmas and how it weighs them, as diffusers' FLUX scripts
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "none"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    max_sequence_length: int | None = Field(None, ge=1, le=4096)  # T5 / Qwen3 tokens; None: the pipeline's 512
    # The guidance a guidance-distilled base ([dev]) is told while training (diffusers' FLUX `--guidance_scale`; the
    # name `guidance_scale` is generation's here)
    train_guidance_scale: float = Field(3.5, ge=0)

    # Data
    resolution: int = Field(512, ge=8, le=4096)
    center_crop: bool = True
    max_image_pixels: int = Field(64_000_000, ge=1)  # decompression-bomb guard for every image read
    min_image_side: int = Field(16, ge=1)  # smaller input images (tracking pixels, icons) are refused

    # Class-prior preservation
    with_prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(200, ge=1)
    sample_batch_size: int = Field(4, ge=1)

    # Generation (also used for class images)
    num_images_per_prompt: int = Field(4, ge=1, le=256)
    num_inference_steps: int = Field(30, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0)
    scheduler: Literal["ddim", "dpmsolver++", "euler_a"] = "ddim"
    negative_prompt: str = ""
    generation_batch_size: int = Field(8, ge=1, le=256)  # images per UNet batch (CFG doubles it inside)

    # Fleet
    max_attempts: int = Field(3, ge=1)
    # Seconds a driver's lease on its RUN or pass output lives without renewal (renewed every quarter of it): a
    # driver silent that long is taken for dead, and the next command takes its RUN over (ray_jobs/state/lease.py).
    lease_ttl: float = Field(60.0, gt=0)
    # LoRA subjects one worker trains (and renders) at once in one UNet batch. 8: measured best on the CPU for the
    # tiny preset (1.48x subjects per CPU-hour, bench/RESULTS.md); for real models on a GPU a prediction until
    # bench/gpu_pack_train.py has run (a pack that does not fit is halved by the fleet at its first OOM).
    pack_subjects: int = Field(8, ge=1, le=64)
    compile_unet: bool = False  # torch.compile the UNet of each worker (GPU: pays back its compile time on long runs)
    # Processes (one GPU each) training one subject with DistributedDataParallel; train_batch_size is per process,
    # so the global batch is train_batch_size x data_parallel x gradient_accumulation_steps. Such a subject trains alone.
    data_parallel: int = Field(1, ge=1, le=64)
    # Experiment trackers each subject's training is logged to (one tracked run per subject, grouped by RUN)
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = []

    # VLM passes (dreamfleet analyze, and the moderation pass of dreamfleet run)
    vlm_batch_size: int = Field(16, ge=1, le=4096)  # rows per generate() call in one actor
    vlm_concurrency: int = Field(1, ge=1)  # model actors
    vlm_gpus_per_actor: float = Field(1.0, ge=0)
    vlm_cpus_per_actor: float | None = Field(None, ge=0)  # None: 1 where the cluster has it to spare, else 0
    # Rows in each part file of a pass's output; each file is committed alone, so also what a killed driver may redo
    vlm_rows_per_file: int = Field(10_000, ge=1)
    vlm_max_new_tokens: int = Field(512, ge=1)  # the answer, after any reasoning
    vlm_thinking_budget: int = Field(1024, ge=0)  # reasoning tokens of Thinking models before the answer is forced
    enable_thinking: bool | None = None  # None: as the model's chat template does by default
    vlm_min_pixels: int = Field(64 * 32 * 32, ge=1)  # pixel budget per image, as Qwen3-VL's processor takes it
    vlm_max_pixels: int = Field(1280 * 32 * 32, ge=1)
    vlm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False  # never on unless the user sets it
    # Which engine decodes: transformers (embedded, the default) or vLLM (pip install "dreamfleet[vllm]"; GPU
    # clusters). No `auto`: the engine changes answers at near-ties and the install a worker needs, so it is chosen,
    # and recorded, never inferred from what a node happens to have.
    vlm_engine: Literal["transformers", "vllm"] = "transformers"
    vlm_tensor_parallel_size: int = Field(1, ge=1)  # vLLM: GPUs of one node each model actor spans
    vlm_engine_args: dict[str, Any] = {}  # vLLM: more vllm.LLM arguments, e.g. {"gpu_memory_utilization": 0.85}
    ocr_prompt: str | None = None  # None: the task's own prompt (engine/vlm_tasks/<task>.py)
    extract_prompt: str | None = None
    moderate_prompt: str | None = None
    caption_prompt: str | None = None
    vqa_prompt: str | None = None  # wraps each row's question; "{question}" marks where it goes
    detect_prompt: str | None = None  # "{categories}" marks where the row's labels go
    parse_prompt: str | None = None
    # Documents and videos in VLM passes
    pdf_dpi: float = Field(144, gt=0, le=1200)  # pages are rendered at this resolution, then fit to the pixel budget
    pdf_max_pages: int = Field(200, ge=1)  # a PDF with more pages is a row error, not thousands of rows
    video_fps: float = Field(2.0, gt=0)  # frames sampled per second of video (Qwen3-VL's default)
    video_max_frames: int = Field(64, ge=2)  # at most this many frames per video, spread evenly over it
    video_max_seconds: float = Field(3600, gt=0)  # a longer video is a row error
    video_max_pixels: int = Field(16 * 1280 * 32 * 32, ge=1)  # all sampled frames of one video together

    # The evaluation pass (dreamfleet evaluate, and the last stage of dreamfleet run): DINO / CLIP-I / CLIP-T
    evaluate: bool = True  # `run` evaluates what it generated, where the evaluation models are at hand
    # The DreamBooth paper's models: hub ids or local folders (the tiny preset: tiny random ones, built offline)
    eval_dino_model: str = "facebook/dino-vits16"
    eval_clip_model: str = "openai/clip-vit-large-patch14"
    eval_batch_size: int = Field(32, ge=1, le=4096)  # images per forward pass of each model
    eval_concurrency: int = Field(1, ge=1)  # evaluation actors
    eval_gpus_per_actor: float = Field(1.0, ge=0)
    eval_cpus_per_actor: float | None = Field(None, ge=0)  # None: 1 where the cluster has it to spare, else 0

    # Curation before training (`train` and `run`): a VLM pass over every instance photo finds the class noun (a
    # photo with one instance found is cropped to it), screens it (a flagged photo is refused) and records why.
    # Off by default for every base: it costs a VLM pass, and the random `tiny` VLM's boxes are noise
    # (`--vlm-model tiny-prior` has learned the tiny world's shapes).
    curate: bool = False
    min_instance_images: int = Field(1, ge=1, le=64)  # usable photos a subject needs after curation, else it fails
    # A photo where grounding finds no instance of the class noun, or several: kept whole (the photo may still show
    # the subject: the VLM missed it, or the subject is a pair), or refused like a flagged photo. Kept by default:
    # the random `tiny` VLM finds nothing or several in photos that do show the subject.
    curate_unlocated: Literal["keep", "refuse"] = "keep"
    # `fixed`: every instance photo trains with `instance_prompt`; `caption`: with `instance_prompt, <caption>`, the
    # caption curation's VLM wrote for that photo (the identifier token stays first). Needs `curate`.
    instance_prompt_mode: Literal["fixed", "caption"] = "fixed"

    # What `run` delivers: images its moderation pass marks unsafe are withheld (kept, flagged, never deleted)
    withhold_unsafe: bool = True
    # When set, an image is unsafe when its moderation score (the probability of "unsafe") reaches this, whatever
    # the model's verdict; None: the model's verdict decides
    moderation_threshold: float | None = Field(None, ge=0)
    # The quality gate after `run`'s evaluation: a subject whose mean DINO or CLIP-T is under these (None: that
    # score is not gated) is retrained with an adjusted recipe, up to gate_retries times, and its best attempt kept.
    # Off by default: the paper's Table 1 gives a bar for its models (DreamBooth on SD: DINO 0.668, CLIP-T 0.305;
    # the report flags under 0.50 / 0.20, below every method there), but not for other models or the tiny ones.
    gate_min_dino: float | None = Field(None, ge=-1, le=1)
    gate_min_clip_t: float | None = Field(None, ge=-1, le=1)
    # A DINO bar relative to the run itself, for models no paper gives a bar for (the tiny ones): a subject whose
    # mean DINO is more than this many median absolute deviations under the median of the run's subjects (first
    # attempts) is under the gate too: the robust outlier rule (3 is the usual k), scale-free, so one k serves
    # random tiny evaluation models (every mean within hundredths) and real ones. DINO only: it compares each
    # subject with its own photos, where CLIP-T's scale changes with each subject's prompts. None: off. With
    # gate_min_dino as well, the higher of the two is the bar.
    gate_relative: float | None = Field(None, ge=0)
    gate_retries: int = Field(1, ge=0, le=8)

    @model_validator(mode="after")
    def _pixel_budget_ordered(self) -> Settings:
        if self.vlm_min_pixels > self.vlm_max_pixels:
            raise ValueError(f"vlm_min_pixels ({self.vlm_min_pixels}) exceeds vlm_max_pixels ({self.vlm_max_pixels})")
        return self

    @model_validator(mode="after")
    def _tensor_parallel_on_vllm(self) -> Settings:
        if self.vlm_tensor_parallel_size > 1 and self.vlm_engine != "vllm":
            raise ValueError("vlm_tensor_parallel_size above 1 needs vlm_engine=vllm")
        return self

    @model_validator(mode="after")
    def _captions_from_curation(self) -> Settings:
        if self.instance_prompt_mode == "caption" and not self.curate:
            raise ValueError("instance_prompt_mode=caption needs curate=true: the captions are curation's")
        return self

    @model_validator(mode="after")
    def _warmup_within_training(self) -> Settings:
        if self.lr_warmup_steps > self.max_train_steps:
            raise ValueError(
                f"lr_warmup_steps ({self.lr_warmup_steps}) exceeds max_train_steps ({self.max_train_steps})"
            )
        return self

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LEARNING_RATES[(self.preset, self.mode)]

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)

    def effective_mixed_precision(self, device_type: str) -> str:
        if self.mixed_precision is not None:
            return self.mixed_precision
        return "bf16" if device_type == "cuda" else "no"

    def autocast(self, device_type: str):
        """The autocast context for `mixed_precision` on this device (a no-op context when it is "no")."""
        import contextlib

        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.effective_mixed_precision(device_type))
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def with_overrides(self, overrides: dict[str, Any], *, source: str = "params") -> Settings:
        """A copy with `overrides` applied, validated; `source` names where they came from in errors."""
        return _validate({**self.model_dump(), **overrides}, source=source)


SETTING_NAMES = frozenset(Settings.model_fields)

# Keys a manifest row may not override: they belong to the whole run, not to one subject.
VLM_SETTINGS = frozenset(
    {
        "vlm_batch_size", "vlm_concurrency", "vlm_gpus_per_actor", "vlm_cpus_per_actor", "vlm_rows_per_file",
        "vlm_max_new_tokens", "vlm_thinking_budget",
        "enable_thinking", "vlm_min_pixels", "vlm_max_pixels", "vlm_dtype", "trust_remote_code",
        "vlm_engine", "vlm_tensor_parallel_size", "vlm_engine_args",
        "ocr_prompt", "extract_prompt", "moderate_prompt", "caption_prompt", "vqa_prompt", "detect_prompt",
        "parse_prompt", "pdf_dpi", "pdf_max_pages", "video_fps", "video_max_frames", "video_max_seconds",
        "video_max_pixels",
    }
)  # fmt: skip
EVAL_SETTINGS = frozenset(
    {"evaluate", "eval_dino_model", "eval_clip_model", "eval_batch_size", "eval_concurrency", "eval_gpus_per_actor",
     "eval_cpus_per_actor"}
)
LOOP_SETTINGS = frozenset(
    {"curate", "withhold_unsafe", "moderation_threshold", "gate_min_dino", "gate_min_clip_t", "gate_relative",
     "gate_retries"}
)
RUN_ONLY_SETTINGS = frozenset(
    {"preset", "max_attempts", "mixed_precision", "pack_subjects", "compile_unet", "trackers", "lease_ttl"}
) | VLM_SETTINGS | EVAL_SETTINGS | LOOP_SETTINGS

# The literature's rates for real models (DreamBooth paper, diffusers' scripts); for the tiny random models, the
# rates at which 100 steps visibly move generations towards the subject (sweep in bench/RESULTS.md).
DEFAULT_LEARNING_RATES = {
    ("standard", "lora"): 1e-4,
    ("standard", "full"): 5e-6,
    ("tiny", "lora"): 5e-3,
    ("tiny", "full"): 1e-3,
}

# Small models need small work: a CPU trains a tiny subject in seconds with these.
TINY_PRESET: dict[str, Any] = {
    "preset": "tiny",
    "max_train_steps": 100,
    "lora_rank": 8,
    "checkpointing_steps": 20,
    "resolution": 32,
    "num_class_images": 4,
    "num_images_per_prompt": 2,
    "num_inference_steps": 10,
    "sample_batch_size": 4,
    "vlm_batch_size": 4,
    "vlm_max_new_tokens": 128,
    "vlm_thinking_budget": 16,
    "vlm_min_pixels": 32 * 32,
    "vlm_max_pixels": 128 * 128,
    "pdf_max_pages": 20,
    "video_max_frames": 8,
    "video_max_pixels": 8 * 128 * 128,
    "eval_dino_model": "tiny",
    "eval_clip_model": "tiny",
    "eval_batch_size": 8,
}


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "settings"
        if e["type"] == "extra_forbidden":
            parts.append(f"{source}: unknown setting '{key}'")
        else:
            parts.append(f"{source}: {key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def _validate(values: dict[str, Any], *, source: str) -> Settings:
    try:
        return Settings.model_validate(values)
    except ValidationError as err:
        raise SettingsError(_format_error(err, source)) from None


# The tiny FLUX bases: the tiny preset, short text sequences, and their pipelines' usual guidance scales.
TINY_FLUX_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-flux": {"max_sequence_length": 32, "guidance_scale": 3.5},
    "tiny-flux2": {"max_sequence_length": 32, "guidance_scale": 4.0},
    # Pretrained with 32 T5 tokens; its flow matching saw guidance input 1 (distillation taught the higher values for
    # sampling), and LoRA trained at 1 learns the subject best (bench/RESULTS.md, "tiny-flux-prior": 0.68-0.73 of the
    # gap to the VAE's floor closed, 0.49-0.60 at 3.5), as diffusers' FLUX DreamBooth examples pass --guidance_scale=1.
    "tiny-flux-prior": {"max_sequence_length": 32, "guidance_scale": 3.5, "train_guidance_scale": 1.0},
}


def preset_for(base_model: str) -> dict[str, Any]:
    """The tiny models (`tiny`, `tiny-sdxl`, `tiny-prior`, `tiny-flux`, `tiny-flux2`) share the tiny preset; every
    other base model the standard one."""
    if base_model in TINY_FLUX_PRESETS:
        return {**TINY_PRESET, **TINY_FLUX_PRESETS[base_model]}
    return dict(TINY_PRESET) if base_model in ("tiny", "tiny-sdxl", "tiny-prior") else {}


def load_settings(
    base_model: str = "tiny",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    recorded: dict[str, Any] | None = None,
) -> Settings:
    """Preset for the base model (or the settings a run `recorded`), then the YAML config file, then command-line
    overrides; each layer wins."""
    values = dict(recorded) if recorded is not None else preset_for(base_model)
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, UnicodeDecodeError) as err:
            raise SettingsError(f"{config_file}: cannot read ({getattr(err, 'strerror', None) or err})") from None
        except yaml.YAMLError as err:
            raise SettingsError(f"{config_file}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"{config_file}: a config file must be a mapping of setting names to values")
        values.update(_check_known(loaded, source=str(config_file)))
    values.update(_check_known(overrides or {}, source="command line"))
    return _validate(values, source=str(config_file) if config_file else "settings")


def _check_known(values: dict[str, Any], *, source: str) -> dict[str, Any]:
    unknown = sorted(set(values) - SETTING_NAMES)
    if unknown:
        raise SettingsError(f"{source}: unknown setting(s) {', '.join(repr(k) for k in unknown)}")
    return values


def parse_params(text: str | None) -> dict[str, Any]:
    """The `params` column: a JSON object of per-subject overrides. Raises SettingsError naming the problem."""
    if text is None or text.strip() == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SettingsError(f"params: not valid JSON ({err.msg} at char {err.pos})") from None
    if not isinstance(value, dict):
        raise SettingsError(f"params: must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - SETTING_NAMES)
    if unknown:
        raise SettingsError(f"params: unknown setting(s) {', '.join(repr(k) for k in unknown)}")
    run_only = sorted(set(value) & RUN_ONLY_SETTINGS)
    if run_only:
        raise SettingsError(f"params: {', '.join(repr(k) for k in run_only)} can only be set for the whole run")
    return value


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """Command-line `key=value` pairs; values parsed as YAML so numbers, booleans and lists keep their types."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SettingsError(f"--set {pair!r}: expected key=value")
        try:
            values[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            values[key.strip()] = value  # not YAML: the plain string, which the setting's type then checks
    return values
