"""Structured-config schemas of the Hydra app, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` fill these dataclasses; a wrong key or a wrong type fails at
compose time with Hydra's own message. The algorithms' settings live beside their code and are
assembled here: ``ModelConfig`` (diffq.models), ``CalibConfig`` (diffq.calib), ``ReconConfig``
(diffq.methods.reconstruct), each method's ``quant.<section>`` (diffq.methods.SETTINGS) and each
finetuning recipe's ``finetune.<section>`` (diffq.finetune.recipes.SETTINGS). Importing this module
does not start Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, SI, OmegaConf

from diffq.calib import CalibConfig, EdaDmConfig
from diffq.finetune.recipes import SETTINGS as RECIPE_SETTINGS
from diffq.methods import SETTINGS as METHOD_SETTINGS
from diffq.methods.reconstruct import ReconConfig
from diffq.models.loading import ModelConfig
from diffq.settings import with_sections
from diffq.tensor_quant import TensorQuant
from diffq.worlds import world_asset


@dataclass
class RuleConfig:
    """One rule of the bit-config grammar; rules apply in order and the last match wins."""

    roles: List[str] = field(default_factory=list)  # layer roles this rule matches (empty: any)
    names: List[str] = field(default_factory=list)  # globs on module names, or "re:<regex>"
    kinds: List[str] = field(default_factory=list)  # layer types this rule matches: linear, conv2d (empty: any)
    weight: Optional[Dict[str, Any]] = None  # partial TensorQuant for weights
    act: Optional[Dict[str, Any]] = None  # partial TensorQuant for input activations
    skip: Optional[bool] = None  # true: keep the layer floating point
    # true (cross_attn_kv layers): the text sequence's token 0 (CLIP's BOS) goes through the FP weight
    # and never reaches the quantizers (MixDQ); a no-op for models without a causal CLIP sequence
    bos: Optional[bool] = None


@dataclass
class AttnQuantConfig:
    """Quantizers on attention matmul inputs (q, k, v and the softmax output)."""

    enabled: bool = False
    qkv: TensorQuant = field(default_factory=lambda: TensorQuant(granularity="tensor", symmetric=True))
    softmax: TensorQuant = field(
        default_factory=lambda: TensorQuant(granularity="tensor", symmetric=False)
    )


@dataclass
class QuantBase:
    """A quantization preset: default formats, ordered per-layer rules, method and knobs (each method's
    own settings section, ``quant.<section>``, is added from :data:`diffq.methods.SETTINGS`)."""

    name: str = MISSING
    method: str = "rtn"  # a registered method: rtn | fp_search (settings in `search`) | mixdq | binarydm
    weight: TensorQuant = field(default_factory=lambda: TensorQuant(granularity="channel"))
    act: TensorQuant = field(
        default_factory=lambda: TensorQuant(format="none", granularity="tensor", symmetric=False)
    )
    rules: List[RuleConfig] = field(default_factory=list)
    attn: AttnQuantConfig = field(default_factory=AttnQuantConfig)
    strict: bool = False  # a rule matching no layer is an error instead of a warning
    recon: str = "none"  # none | layer | block (BRECQ / AdaRound) | fbr (EDA-DM); settings in `recon`
    split_shortcut: bool = False  # Q-Diffusion: separate activation ranges for the up path's concat halves
    keep_fp_weights: bool = True  # keep the FP weight next to the frozen fake-quant one


@dataclass
class TrainRuleConfig:
    """One rule of the finetuning selection (same matchers as ``quant.rules``; the last match wins)."""

    roles: List[str] = field(default_factory=list)  # layer roles this rule matches (empty: any)
    names: List[str] = field(default_factory=list)  # globs on module names, or "re:<regex>"
    kinds: List[str] = field(default_factory=list)  # weight | bias | weight_scale | act_scale | lora | other


@dataclass
class LoraConfig:
    """Low-rank FP adapters (kind ``lora``): merged (the layer quantizes ``W + alpha/rank * B A``) or a
    side branch kept at inference (``Q(W) x + alpha/rank * B A x``)."""

    rank: int = 4
    alpha: float = 4.0
    # merge (added to the latent weight before quantization, folded into it at the end: no capacity at
    # inference) | side (a branch x -> B A x beside the quantized weight, kept at inference in the model dtype)
    mode: str = "merge"


@dataclass
class FinetuneDataConfig:
    """Training data, built from the FP teacher's sampler trajectories over prompts."""

    # trajectory (the teacher's own calls, on-policy) | noised (its final latents noised afresh at the
    # sampler's timesteps) | images (the world's images through the VAE, diffusion loss; needs model.world)
    source: str = "trajectory"
    # calib (the calibration prompts) | world (the world's training captions) | file | auto (world on a
    # model with a world, else prompts_file when set, else calib)
    prompts: str = "calib"
    prompts_file: Optional[str] = None
    num_prompts: int = 16
    val_prompts: int = 8  # held-out prompts (and seeds) whose teacher calls give the validation loss
    val_seed: int = SI("${add:8765,${seed}}")  # seed of the held-out trajectories (training: `seed`)
    steps: Optional[int] = None  # sampler steps of the trajectories (default: the model's)
    batch_size: int = 4  # prompts per sampler batch when capturing the trajectories
    seed: int = SI("${add:4321,${seed}}")


@dataclass
class ExtraLossConfig:
    """An extra loss term (diffq/finetune/losses.py) on the layers its roles/names match."""

    name: str = MISSING  # layer_mse
    weight: float = 1.0
    roles: List[str] = field(default_factory=list)
    names: List[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    """Optimiser of finetuning: one learning rate per kind of parameter."""

    name: str = "adam"  # adam | adamw
    lr: float = 1e-5  # weights and biases
    act_scale_lr: float = 1e-4
    weight_scale_lr: float = 1e-5
    lora_lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"  # cosine | constant (after the warm-up)
    warmup: float = 0.05  # fraction of the steps
    clip_grad: float = 1.0  # max gradient norm (0: off)


@dataclass
class FinetuneBase:
    """Quantization-aware finetuning after PTQ (diffq/finetune/); ``steps: 0`` (finetune=none) skips it
    (each recipe's own settings section, ``finetune.<section>``, is added from
    :data:`diffq.finetune.recipes.SETTINGS`)."""

    name: str = "none"
    # plain (one stage, `train`) | quest (QuEST's stages, settings in `quest`) | binarydm (progressive
    # initialisation, then `train`; settings in `binarydm`): a registered recipe
    recipe: str = "plain"
    steps: int = 0  # all stages together
    batch_size: int = 8  # items per step: one trajectory's denoiser call each, CFG branches included
    train: List[TrainRuleConfig] = field(default_factory=list)  # recipe plain
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    distill_weight: float = 1.0  # MSE between the student's and the FP teacher's denoiser outputs
    data_weight: float = 0.0  # MSE to the diffusion target (data.source=images)
    extra_losses: List[ExtraLossConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # what a selected weight_scale does: learn (LSQ step size) | follow (recomputed from the latent weight
    # at every forward, no gradient: BitNet b1.58's gamma = mean|W|; binary sigmas are always learned)
    weight_scale: str = "learn"
    eval_every: Optional[int] = None  # steps between validation losses (null: steps / 10; 0: no validation)
    keep: str = "best"  # best (the state with the lowest validation loss) | last
    checkpoint_every: int = 50  # steps between checkpoints (in the cache; a rerun resumes)
    resume: bool = True
    autocast: bool = True  # bfloat16 autocast of the student on CUDA
    grad_checkpointing: bool = False  # diffusers gradient checkpointing (memory for compute)
    seed: int = SI("${seed}")


QuantConfig = with_sections("QuantConfig", QuantBase, METHOD_SETTINGS)
FinetuneConfig = with_sections("FinetuneConfig", FinetuneBase, RECIPE_SETTINGS)


@dataclass
class SamplerConfig:
    """Sampler overrides; null fields keep the model's defaults."""

    name: str = "default"
    scheduler: Optional[str] = None  # diffusers scheduler class name to swap in
    steps: Optional[int] = None
    guidance: Optional[float] = None
    batch_size: int = 4


@dataclass
class FidConfig:
    """FID/KID settings (see diffq/eval/fid.py)."""

    reference: Optional[str] = None  # real images: a registered world's name (its renders) or a folder
    num_reference: int = 1000
    backend: str = "torchmetrics"  # torchmetrics | clean-fid
    resize: str = "tf_bilinear"  # tf_bilinear (TF / torch-fidelity numbers) | clean (clean-fid)
    weights: Optional[str] = None  # Inception weights file; default: torch-fidelity's if cached, else offline copy
    kid_subset_size: int = 1000


@dataclass
class GenEvalConfig:
    """GenEval prompts and scoring (diffq/eval/geneval.py; real backend: diffq/eval/geneval_detector.py)."""

    # prompts: a registered world's name (its GenEval set) or a path to an evaluation_metadata.jsonl
    # (the official 553); they replace eval.prompts, and every `stride`-th entry is used (before
    # images_per_task balancing)
    metadata: Optional[str] = None
    stride: int = 1
    # images of every task (a multiple of eval.images_per_prompt): a task's prompts are repeated
    # (new seeds) or an evenly spaced subset is kept (diffq.eval.geneval.balanced_entries);
    # null = every prompt once, the official protocol
    images_per_task: Optional[int] = None
    backend: str = "auto"  # auto (metadata's world's own detector, else mask2former) | <world> | mask2former
    detector: str = "facebook/mask2former-swin-small-coco-instance"  # hub id or folder (mask2former backend)
    # [shortest_edge, longest_edge] the detector's image processor resizes to ([800, 1333]: the
    # official mmdet evaluator's scale); null = the processor's configured size
    detector_size: Optional[List[int]] = None
    clip_model: str = "openai/clip-vit-large-patch14"  # colour classifier (mask2former backend)
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    position_threshold: float = 0.1
    bgcolor: str = "#999"  # colour outside the object's mask in the crop CLIP classifies
    colors: List[str] = field(default_factory=lambda: ["red", "orange", "yellow", "green", "blue", "purple", "pink",
                                                       "brown", "black", "white"])
    templates: List[str] = field(default_factory=lambda: ["a photo of a {color} {cls}",
                                                          "a photo of a {color}-colored {cls}",
                                                          "a photo of a {color} object"])
    batch_size: int = 8


@dataclass
class EvalConfig:
    """What to generate for evaluation and which metrics to compute."""

    name: str = "quick"
    prompts: List[str] = field(default_factory=list)
    images_per_prompt: int = 1
    seed: int = SI("${seed}")
    # psnr, ssim, lpips, fid, fid_fp, clip_score, geneval (see diffq/eval/suite.py); geneval is
    # added by itself when eval.geneval.metadata is set
    metrics: List[str] = field(default_factory=lambda: ["psnr", "ssim"])
    geneval: GenEvalConfig = field(default_factory=GenEvalConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    clip_model: Optional[str] = None  # hub id or folder for clip_score
    lpips_net: str = "alex"  # alex | vgg | squeeze
    grid: bool = True
    grid_max: int = 8  # at most this many columns in grid.png


@dataclass
class PathsConfig:
    """Where heavy reusable artifacts (calibration sets, FP images) are cached."""

    cache_dir: str = "${oc.env:DIFFQ_CACHE_DIR,${oc.env:HOME}/.cache/diffq}"


@dataclass
class SweepConfig:
    """What a sweep's jobs return to the sweeper, and free values sweep presets interpolate."""

    # summary columns (diffq.sweep.rows: psnr, ssim, geneval, fid_to_fp, w_bits, a_bits, ...) a job
    # returns, in order, for a sweeper that optimises them (hydra/sweeper=optuna: experiment=optuna_bits)
    objectives: List[str] = field(default_factory=list)
    # values the experiment's rules refer to as ${sweep.bits.<name>} (e.g. per-role weight bits)
    bits: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DiffqConfig:
    """The whole job: load -> calibrate -> quantize (-> reconstruct -> finetune) -> evaluate -> save."""

    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    calib: CalibConfig = MISSING
    recon: ReconConfig = field(default_factory=ReconConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    export: bool = False  # write the quantized denoiser to <run dir>/model/
    export_codec: Optional[str] = None  # a named export codec where it applies (base3: ternary at 1.6 bits)
    load: Optional[str] = None  # load an exported quantized denoiser instead of quantizing
    packed: bool = False  # with load=: keep sub-byte weights packed in memory, unpacked per layer at forward
    # torchao: run the quantized denoiser on real low-bit kernels (diffq.deploy; pip install -e '.[deploy]');
    # spec.txt lists each layer as kernel or simulated; with export=true <run dir>/model/ is the deployed
    # folder plain diffusers with torchao loads
    deploy: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # one knob for the run's randomness: the training, calibration, reconstruction and sampling seeds
    # default to offsets of it (calib.seed = 1234 + seed, eval.seed = seed, ...), each settable on its own
    seed: int = 0
    log_level: str = "INFO"


SCHEMAS: dict[str, type] = {"quant": QuantConfig, "recon": ReconConfig, "finetune": FinetuneConfig,
                             "calib": CalibConfig}  # the quantize stage's groups


def register_configs() -> None:
    """Register the job schema (``diffq_schema``, the defaults list's first entry) so every group's YAML is
    validated against its typed field at compose time; no group lists a ``schema`` option."""
    if not OmegaConf.has_resolver("world_asset"):  # ${world_asset:<world>,<folder>}: a world's trained model
        OmegaConf.register_new_resolver("world_asset", world_asset)
    if not OmegaConf.has_resolver("add"):  # ${add:1234,${seed}}: a seed offset from the top-level seed
        OmegaConf.register_new_resolver("add", lambda *xs: sum(xs))
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="diffq_schema", node=DiffqConfig)


__all__ = ["AttnQuantConfig", "CalibConfig", "DiffqConfig", "EdaDmConfig", "FinetuneConfig", "ModelConfig",
           "QuantConfig", "ReconConfig", "RuleConfig", "SCHEMAS", "register_configs"]
