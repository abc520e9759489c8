"""Structured-config schemas of the Hydra app, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` fill these dataclasses; a wrong key or a wrong type fails at
compose time with Hydra's own message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, SI, OmegaConf

from diffq.tensor_quant import TensorQuant
from diffq.worlds import world_asset


@dataclass
class ModelConfig:
    """Which diffusion pipeline to load and how to sample it."""

    name: str = MISSING
    family: str = MISSING  # sd | sdxl | dit | pixart | sd3 | flux
    source: str = "tiny"  # tiny (random, built from config) | pretrained (hub id or local folder)
    pretrained: Optional[str] = None  # hub id or local folder when source=pretrained
    pipeline_class: str = MISSING  # diffusers pipeline class name
    resolution: int = 32
    steps: int = 10
    guidance: float = 5.0
    dtype: str = "float32"  # float32 | float16 | bfloat16
    variant: Optional[str] = None  # e.g. fp16 weights variant on the hub
    seed: int = 0  # seed of the random weights of a tiny model
    tiny: Dict[str, Any] = field(default_factory=dict)  # size overrides for tiny builders
    call_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra pipeline __call__ kwargs
    # prompts this model understands, replacing calib/eval prompts when set (class labels of
    # class-conditional models such as DiT)
    prompts: List[str] = field(default_factory=list)
    # fail early on prompts with words the model's word-level tokenizer does not know (testbed)
    vocabulary_check: bool = False
    # the procedural world the model was trained on (a registered world, diffq/worlds.py): eval=quick then
    # draws its prompts from the world's GenEval set and scores them with the world's detector
    world: Optional[str] = None
    # CLIP model for clip_score (hub id or folder): the one the paper evaluations use
    clip_model: Optional[str] = None


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
class SearchConfig:
    """Per-layer FP format and scale search (``method: fp_search``, diffq/methods/fp_search.py)."""

    weight: bool = True  # search the weight format and per-channel clipping of FP layers
    act: bool = True  # search the input-activation format (and clipping of static ranges)
    alpha_min: float = 0.1  # clipping grid: maxval = alpha * amax, alpha in [alpha_min, alpha_max] (and 1)
    alpha_max: float = 1.2
    alphas: int = 100  # points of the clipping grid
    act_inputs: int = 4  # calibration calls whose layer inputs score the activation candidates
    memory_mb: int = 2048  # statistics held at once; layers are searched in chunks under it


@dataclass
class MixDQConfig:
    """MixDQ's mixed-precision search (``method: mixdq``, diffq/methods/mixdq.py)."""

    weight_bits: float = 8.0  # target parameter-weighted average weight bits
    weight_mb: Optional[float] = None  # or a memory budget for the quantized weights (MB), replacing weight_bits
    act_bits: float = 8.0  # target element-weighted average activation bits
    weight_bits_content: List[int] = field(default_factory=lambda: [2, 4, 8])
    weight_bits_quality: List[int] = field(default_factory=lambda: [4, 8])
    act_bits_candidates: List[int] = field(default_factory=lambda: [4, 8])
    # the most activation-sensitive layers of each group (content by its SSIM, quality by its SQNR, at
    # the lowest candidate width) keep FP inputs: ceil(fraction x group size) per group; they count
    # at 16 bits inside act_bits, the rest are lowered to keep the whole at or under it
    fp_act_fraction: float = 0.01
    content_roles: List[str] = field(default_factory=lambda: ["ffn_up", "ffn_down", "cross_attn_q", "cross_attn_kv"])
    content_names: List[str] = field(default_factory=lambda: ["*.attn2.to_out.*"])
    band: float = 0.02  # each program's average bits lie in [target - 2 band, target]: never over budget
    # the code's family: content/quality budget ratios k x budgets target + offset (linspace(target - 0.3,
    # target, 10)); weights are chosen first (activations FP), then activations given those weights
    k_weight: List[float] = field(default_factory=lambda: [round(float(x), 4) for x in np.linspace(0.46, 1.36, 10)])
    k_act: List[float] = field(default_factory=lambda: [round(float(x), 4) for x in np.linspace(0.94, 1.09, 20)])
    budget_offsets: List[float] = field(default_factory=lambda: [round(float(x), 4) for x in np.linspace(-0.3, 0, 10)])
    num_prompts: int = 32  # search prompts (seeds apart from the evaluation's) scoring content and choosing plans
    plan_prompts: int = 8  # the first search prompts whose images choose among the plans (the code: 1 image)
    sqnr_calls: int = 32  # denoiser calls of the search prompts' FP trajectories the quality group's SQNR runs on
    ssim_window: str = "global"  # content SSIM window: global (the code's 511 px on 512) | local (11 px Gaussian)
    decoupled: bool = True  # SSIM for the content group, SQNR for the quality group (false: SQNR for all)
    control: bool = False  # the control: uniform weight_bits / act_bits with exactly the plan's FP inputs
    plan: Optional[str] = None  # a written mixdq_plan.yaml: reuse its bits, skip the search


@dataclass
class BinaryDMConfig:
    """BinaryDM's learnable multi-basis layout (``method: binarydm``, diffq/methods/binarydm.py)."""

    high_res_bases: int = 2  # sign bases of the high-resolution layers (the rest: quant.weight.bits)
    min_resolution: float = 0.5  # UNet: levels at this fraction of the input resolution or more (never the lowest)
    edge_blocks: int = 1  # transformers: the first and last blocks count as high-resolution


@dataclass
class QuantConfig:
    """A quantization preset: default formats, ordered per-layer rules, method and knobs."""

    name: str = MISSING
    # rtn | fp_search (settings in `search`) | mixdq (`mixdq`) | binarydm (`binarydm`)
    method: str = "rtn"
    weight: TensorQuant = field(default_factory=lambda: TensorQuant(granularity="channel"))
    act: TensorQuant = field(
        default_factory=lambda: TensorQuant(format="none", granularity="tensor", symmetric=False)
    )
    rules: List[RuleConfig] = field(default_factory=list)
    attn: AttnQuantConfig = field(default_factory=AttnQuantConfig)
    strict: bool = False  # a rule matching no layer is an error instead of a warning
    recon: str = "none"  # none | layer | block (BRECQ / AdaRound) | fbr (EDA-DM); settings in `recon`
    search: SearchConfig = field(default_factory=SearchConfig)  # method fp_search
    mixdq: MixDQConfig = field(default_factory=MixDQConfig)  # method mixdq
    binarydm: BinaryDMConfig = field(default_factory=BinaryDMConfig)  # method binarydm
    split_shortcut: bool = False  # Q-Diffusion: separate activation ranges for the up path's concat halves
    keep_fp_weights: bool = True  # keep the FP weight next to the frozen fake-quant one


@dataclass
class ReconConfig:
    """Reconstruction settings (diffq/methods/reconstruct.py); defaults are BRECQ's paper values."""

    name: str = "paper"
    iters: int = 20000  # rounding steps per unit (fbr: the joint loop)
    lr: float = 1e-3  # Adam lr of the rounding variables
    reg_weight: float = 0.01  # lambda of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iters with the regulariser off
    act_iters: int = 5000  # LSQ steps on activation step sizes after rounding (layer/block)
    act_lr: float = 4e-4
    fine_grained_weight: float = 1.0  # fbr: weight of the inner layers' output MSE (EDA-DM add_loss)
    fbr_regularizer: bool = False  # fbr: keep the rounding regulariser in the joint loop
    qdrop: float = 0.0  # probability of an FP input element (QDrop); EDA-DM uses 0.5
    scale_aware: bool = False  # FP4DiT: rounding variable V' = s*V with s each weight's FP step
    unit: str = "block"  # block (whole UNet blocks) | pair (BRECQ's ResNet + Transformer pairs); block/fbr modes
    batch_size: Optional[int] = None  # rows per step drawn across calibration calls (null: one call's rows)
    seed: int = SI("${seed}")


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
class QuestConfig:
    """QuEST's selective finetuning (``finetune.recipe: quest``, diffq/finetune/recipes/quest.py)."""

    select: str = "both"  # temporal (TLA) | sensitive (CMA) | both (TLA then CMA) | all (TLA, then every layer)
    sensitive: str = "released"  # released (sensitive_roles) | measured (activation-bit sweep per layer)
    temporal_roles: List[str] = field(default_factory=lambda: ["time_proj", "adanorm"])
    sensitive_roles: List[str] = field(default_factory=lambda: ["ffn_up", "ffn_down"])  # the released choice (SD)
    fraction: float = 0.15  # measured: the most sensitive fraction of the candidate layers
    sweep_bits: List[int] = field(default_factory=lambda: [8, 6, 4])  # measured: ranked by SQNR at the lowest
    sweep_calls: int = 8  # measured: calibration calls each probe runs on
    tla_fraction: float = 0.3  # of finetune.steps spent in the TLA stage when both stages run
    tla_act_scale_lr: float = 1.0e-5  # step-size lr of the TLA stage (CMA: finetune.optim.act_scale_lr)
    layer_weight: float = 1.0  # weight of L_TLA and L_CMA (the denoiser's L_G: finetune.distill_weight)


@dataclass
class BinaryDMTrainConfig:
    """BinaryDM's progressive initialisation (``finetune.recipe: binarydm``)."""

    progressive: bool = True  # binarise group by group from the middle outwards (inputs quantized with their layer)
    progressive_steps: int = 1  # steps per group (the released code: one training step per group)


@dataclass
class FinetuneConfig:
    """Quantization-aware finetuning after PTQ (diffq/finetune/); ``steps: 0`` (finetune=none) skips it."""

    name: str = "none"
    # plain (one stage, `train`) | quest (QuEST's stages, settings in `quest`) | binarydm (progressive
    # initialisation, then `train`; settings in `binarydm`)
    recipe: str = "plain"
    steps: int = 0  # all stages together
    batch_size: int = 8  # items per step: one trajectory's denoiser call each, CFG branches included
    train: List[TrainRuleConfig] = field(default_factory=list)  # recipe plain
    quest: QuestConfig = field(default_factory=QuestConfig)
    binarydm: BinaryDMTrainConfig = field(default_factory=BinaryDMTrainConfig)
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


@dataclass
class EdaDmConfig:
    """EDA-DM's timestep-diverse selection (diffq/calib/select.py)."""

    hook: str = "auto"  # module whose output is compared across steps (auto: mid-block attention output)
    lam: float = 5.0  # weight of diversity vs density (5.0 for SD in the paper's code)
    radius: Optional[float] = None  # absolute density radius (the code's 0.3 for SD); null: radius_quantile
    radius_quantile: float = 0.3  # radius as this quantile of the pairwise feature distances


@dataclass
class CalibConfig:
    """Calibration set: which prompts the FP sampler runs and which denoiser inputs are kept."""

    name: str = "uniform"
    # uniform (num_steps evenly spaced steps per trajectory) | edadm | all_steps_random (num_samples
    # drawn from every step of every trajectory)
    selection: str = "uniform"
    num_samples: Optional[int] = None  # edadm / all_steps_random; default num_prompts x num_steps
    edadm: EdaDmConfig = field(default_factory=EdaDmConfig)
    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None  # one prompt per line; overrides `prompts`
    num_prompts: int = 4
    num_steps: int = 4  # sampler steps kept per trajectory, evenly spaced
    steps: Optional[int] = None  # sampler steps of the calibration run (default: model.steps)
    batch_size: int = 4
    seed: int = SI("${add:1234,${seed}}")
    cache: bool = True


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
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # one knob for the run's randomness: the training, calibration, reconstruction and sampling seeds
    # default to offsets of it (calib.seed = 1234 + seed, eval.seed = seed, ...), each settable on its own
    seed: int = 0
    log_level: str = "INFO"


def register_configs() -> None:
    """Register the job schema (``diffq_schema``, the defaults list's first entry) so every group's YAML is
    validated against its typed field at compose time; no group lists a ``schema`` option."""
    if not OmegaConf.has_resolver("world_asset"):  # ${world_asset:<world>,<folder>}: a world's trained model
        OmegaConf.register_new_resolver("world_asset", world_asset)
    if not OmegaConf.has_resolver("add"):  # ${add:1234,${seed}}: a seed offset from the top-level seed
        OmegaConf.register_new_resolver("add", lambda *xs: sum(xs))
    cs = ConfigStore.instance()
    cs.store(name="diffq_schema", node=DiffqConfig)
