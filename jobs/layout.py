"""The stage graph: where each stage writes, which config keys and upstream stages it depends on.

    {workdir}/ingest                     image shards (WebDataset)
    {workdir}/latents/{vae}-{hash}       VAE moments store (Zarr), one directory per latents config
    {workdir}/teacher/{name}-{res}px-{cache}-{hash}
                                         teacher features store (Zarr), one directory per teacher config
    {workdir}/text/{encoder}-{hash}      caption store (Zarr), when data.captions is set
    {workdir}/runs/{run}                 training run: checkpoints, metrics, ema.safetensors
    {workdir}/runs/{run}/samples         samples.npz + grid.png (samples-step{N}: from checkpoint N)
    {workdir}/runs/{run}/eval            metrics.json (eval-step{N}: of samples-step{N})
    {workdir}/reference/holdout/ingest   held-out reference images (eval.reference = "holdout")
    {workdir}/reference/stats-{hash}.npz reference Inception statistics, cached

The run name defaults to model-align-hash, the hash covering what shapes the run's result except
its length, so raising `train.steps` (or `train.images`) continues the same run from its last checkpoint
(with `train.cooldown_steps` the length is hashed as well: its LR schedule depends on it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from jobs.stage import StageSpec, StageState, canonical_json, evaluate_state, lookup
from pipeline.progress import progress_bar
from pipeline.stores.checksum import sha256_file
from pipeline.stores.mirror import WorkingCopy
from pipeline.stores.objects import is_url
from pipeline.stores.zarr_store import StoreReader
from pipeline.stores.zarr_verify import file_size
from schemas.config import ExperimentConfig, TrainConfig
from schemas.manifest import Manifest

CAPTIONS = "captions.json"  # in the ingest directory: {key: [caption, ...]} when data.captions is set
STAGES = ("ingest", "latents", "teacher", "text", "train", "sample", "evaluate")


def stages(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The stages of this config in order: `text` only when the images have captions (data.captions)."""
    return tuple(s for s in STAGES if s != "text" or cfg.data.captions != "none")



# ----------------------------------------------------------------------------------------------
#                                     Fingerprinted keys
# ----------------------------------------------------------------------------------------------

INGEST_KEYS = tuple(
    f"data.{k}"
    for k in ("source", "path", "resolution", "limit", "offset", "on_error", "shard_size",
              "synthetic_count", "synthetic_classes", "seed")
)
LATENT_KEYS = ("vae.name", "vae.weights", "vae.flip", "vae.precision", "stores.samples_per_shard")
TEACHER_KEYS = (
    "teacher.name", "teacher.weights", "teacher.resolution", "teacher.cache", "teacher.dtype",
    "teacher.hidden_layer", "teacher.precision", "vae.flip", "stores.samples_per_shard",
)
TEXT_KEYS = ("text.name", "text.weights", "text.max_length", "text.captions_per_image", "stores.samples_per_shard")
# Fields that say how a run executes, not what it computes.
TRAIN_EXECUTION = {"name", "launcher", "num_workers", "use_gpu", "log_every", "sample_every", "grid",
                   "loader_workers", "prefetch", "max_failures"}
MODEL_KEYS = ("model.name", "model.num_classes", "model.class_dropout", "model.use_rope", "model.use_swiglu")
SAMPLE_KEYS = tuple(f"sample.{k}" for k in ("num", "labels", "sampler", "heun", "heun_guidance", "steps",
                                             "cfg_scale", "guidance_low", "guidance_high", "precision", "seed",
                                             "weights", "batch_size", "checkpoint"))  # batch i's noise and labels: (seed, i)


def sample_keys(cfg: ExperimentConfig) -> tuple[str, ...]:
    """SAMPLE_KEYS, plus the prompts file and the text encoder for text-to-image (added later: class-
    conditional samples keep their fingerprints)."""
    return SAMPLE_KEYS + (("sample.prompts",) + TEXT_KEYS if cfg.data.captions != "none" else ())
EVAL_KEYS = ("eval.reference", "eval.reference_offset", "eval.reference_limit", "eval.inception",
             "eval.splits", "eval.k")


def ingest_keys(cfg: ExperimentConfig) -> tuple[str, ...]:
    """INGEST_KEYS, plus the order keys when the order is a seeded permutation (data.order was added
    after ingests existed: those in the source's order keep their fingerprints)."""
    captions = ("data.captions", "data.captions_path", "data.caption_templates") if cfg.data.captions != "none" else ()
    return INGEST_KEYS + (("data.shuffled", "data.order_seed") if cfg.data.shuffled else ()) + captions


# align.* fields added after runs existed: in a fingerprint only when set away from these defaults.
ALIGN_ADDED = {"projector": "mlp", "spatial_norm": False, "spatial_norm_gamma": 1.0}


def align_keys(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The align.* fields the configured objective declares as shaping its result."""
    from pipeline.align.registry import objective_class

    return tuple(f"align.{f}" for f in objective_class(cfg.train.align).config_fields
                 if getattr(cfg.align, f) != ALIGN_ADDED.get(f, object()))


# Fields added after runs existed: they enter a run's fingerprint and name only when set, so runs
# trained before them keep their names and stay up to date.
TRAIN_ADDED = {"cooldown_steps": 0}


def train_keys(cfg: ExperimentConfig) -> tuple[str, ...]:
    fields = tuple(f"train.{f}" for f in TrainConfig.model_fields
                   if f not in TRAIN_EXECUTION and getattr(cfg.train, f) != TRAIN_ADDED.get(f, object()))
    return MODEL_KEYS + align_keys(cfg) + fields


def run_name(cfg: ExperimentConfig) -> str:
    """`train.name`, or model-align-hash of everything in the run's fingerprint but its length.

    With an LR cool-down the length shapes every late step's learning rate, so it is hashed too: a
    longer run is a new run, not the continuation of a shorter one.
    """
    if cfg.train.name:
        return cfg.train.name
    length = () if cfg.train.cooldown_steps else ("train.steps", "train.images")
    keys = [k for k in train_keys(cfg) if k not in length] + list(TEACHER_KEYS) + list(LATENT_KEYS)
    digest = hashlib.sha256(canonical_json({k: lookup(cfg, k) for k in keys}).encode()).hexdigest()[:8]
    return f"{cfg.model.name.replace('/', '-')}-{cfg.train.align}-{digest}"


# ----------------------------------------------------------------------------------------------
#                                     Output verification
# ----------------------------------------------------------------------------------------------


def _outputs_verify(manifest: Manifest, directory: Path, deep: bool) -> str | None:
    """Files and shards exist with the recorded sizes; store arrays exist and their range markers'
    checksums are those the manifest recorded (a store swapped under its manifest). Missing shard
    files of a store are found when it is opened for reading. `deep`: rehash every file and every
    store shard file; an output recorded without a checksum fails a deep check."""
    store, digests = directory / "store.zarr", None
    to_hash: list[tuple[Path, str]] = []
    for entry in manifest.outputs:
        if entry.kind in ("shard", "file"):
            path = directory / entry.name
            size = file_size(path)
            if size is None:
                return f"{path} is missing"
            if entry.bytes and size != entry.bytes:
                return f"{path} has {size} bytes, manifest says {entry.bytes}"
            if deep and not entry.sha256:
                return f"{path} was recorded without a checksum; rerun its stage with --force to add one"
            to_hash.append((path, entry.sha256))
        elif entry.kind == "array":
            if not (store / entry.name).exists():
                return f"array {entry.name} is missing from {store}"
            if entry.sha256:
                try:
                    digests = StoreReader(store, allow_incomplete=True).array_digests() if digests is None else digests
                except (OSError, ValueError) as exc:
                    return str(exc)
                if digests.get(entry.name) != entry.sha256:
                    return f"array {entry.name} of {store} is not the one the manifest records (its shard checksums differ)"
    if deep and any(not p.is_file() for p, _ in to_hash):
        return f"{directory} is on object storage: `repa status --deep` pulls its files to hash them"
    if deep and to_hash:
        with progress_bar(total=sum(p.stat().st_size for p, _ in to_hash), unit="B", unit_scale=True,
                      desc=f"sha256 {directory.name}", leave=False, disable=None) as bar:
            for path, sha in to_hash:
                if sha256_file(path) != sha:
                    return f"{path} does not have the sha256 the manifest records (its bytes changed)"
                bar.update(path.stat().st_size)
    if deep and any(e.kind == "array" for e in manifest.outputs):
        try:
            return StoreReader(store, allow_incomplete=True).verify(deep=True)
        except (OSError, ValueError) as exc:
            return str(exc)
    return None


# ----------------------------------------------------------------------------------------------
#                                         The graph
# ----------------------------------------------------------------------------------------------


REFERENCE_IMAGES = ("holdout", "source")  # eval.reference values ingested on the side


def holdout_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config whose ingest stage holds the reference images of eval.reference = "holdout" (the
    training source) or "source" (eval.reference_source / reference_path): {workdir}/reference/{kind}/ingest,
    images eval.reference_offset .. + eval.reference_limit."""
    e = cfg.eval
    held = cfg.model_copy(deep=True)
    held.workdir = (f"{cfg.workdir.rstrip('/')}/reference/{e.reference}" if is_url(cfg.workdir)
                    else str(Path(cfg.workdir) / "reference" / e.reference))
    if e.reference == "source":
        held.data.source = e.reference_source or cfg.data.source
        held.data.path = e.reference_path
    held.data.offset, held.data.limit = e.reference_offset, e.reference_limit
    return held


# First-level subdirectories of a stage's output that others write: a run's samples and eval (other
# stages' outputs) and ray (Ray Train's own checkpoint copies); a stage's push and pull leave them alone.
NESTED = {"train": ("samples", "eval", "ray")}


def working_copy(cfg: ExperimentConfig) -> WorkingCopy | None:
    """The local working copy of an object-store workdir (pipeline.stores.mirror), None for a local one."""
    return WorkingCopy.of(cfg.workdir) if is_url(cfg.workdir) else None


def workdir(cfg: ExperimentConfig) -> Path:
    """The local directory the stages read and write: the workdir, or its working copy."""
    copy = working_copy(cfg)
    return copy.root if copy is not None else Path(cfg.workdir)



def _run_dir(cfg: ExperimentConfig) -> Path:
    return workdir(cfg) / "runs" / run_name(cfg)


def _checkpoint_suffix(cfg: ExperimentConfig) -> str:
    """"" for the run's final weights; "-step{N}" when sampling the checkpoint of step N."""
    return f"-step{cfg.sample.checkpoint}" if cfg.sample.checkpoint else ""


def _sample_dir(cfg: ExperimentConfig) -> Path:
    return _run_dir(cfg) / f"samples{_checkpoint_suffix(cfg)}"


def _eval_dir(cfg: ExperimentConfig) -> Path:
    return _run_dir(cfg) / f"eval{_checkpoint_suffix(cfg)}"


def _train_inputs(cfg: ExperimentConfig) -> tuple[str, ...]:
    from pipeline.align.registry import objective_class

    text = ("text",) if cfg.data.captions != "none" else ()
    return (("latents", "teacher") if objective_class(cfg.train.align).reads_teacher else ("latents",)) + text


def _eval_inputs(cfg: ExperimentConfig) -> tuple[str, ...]:
    return ("sample", "ingest") if cfg.eval.reference in ("ingest", "holdout") else ("sample",)


def _eval_keys(cfg: ExperimentConfig) -> tuple[str, ...]:
    """EVAL_KEYS, plus what selects the reference images when they are ingested on the side."""
    if cfg.eval.reference in REFERENCE_IMAGES:
        held = holdout_config(cfg)
        keys = ("data.source", "data.path", "data.resolution") + (
            ("data.shuffled", "data.order_seed") if held.data.shuffled else ())
        if cfg.eval.reference == "source":
            keys += ("eval.reference_source", "eval.reference_path")
        return EVAL_KEYS + keys
    return EVAL_KEYS


def _variant(cfg: ExperimentConfig, keys: tuple[str, ...], label: str) -> str:
    """A readable label plus the hash of the stage's config keys: configs that differ in any of them
    get directories side by side, so switching back and forth rebuilds and deletes nothing."""
    digest = hashlib.sha256(canonical_json({k: lookup(cfg, k) for k in keys}).encode()).hexdigest()[:8]
    return f"{label}-{digest}".replace("/", "-")


def _latents_dir(cfg: ExperimentConfig) -> Path:
    return workdir(cfg) / "latents" / _variant(cfg, LATENT_KEYS, cfg.vae.name)


def _teacher_dir(cfg: ExperimentConfig) -> Path:
    t = cfg.teacher
    return workdir(cfg) / "teacher" / _variant(cfg, TEACHER_KEYS, f"{t.name}-{t.resolution}px-{t.cache}")


def _text_dir(cfg: ExperimentConfig) -> Path:
    return workdir(cfg) / "text" / _variant(cfg, TEXT_KEYS, cfg.text.name.split("/")[-1])


def variants(cfg: ExperimentConfig) -> dict[str, list[Path]]:
    """Other variants of the latents and teacher stores kept under the workdir (not this config's)."""
    out = {}
    for stage, current in (("latents", _latents_dir(cfg)), ("teacher", _teacher_dir(cfg))):
        parent = current.parent
        out[stage] = sorted(p for p in parent.iterdir() if p.is_dir() and p != current
                            and (p / "manifest.json").is_file()) if parent.is_dir() else []
    return out


SPECS: dict[str, StageSpec] = {
    "ingest": StageSpec("ingest", 1, ingest_keys, lambda c: (), lambda c: workdir(c) / "ingest",
                        _outputs_verify),
    "latents": StageSpec("latents", 1, lambda c: LATENT_KEYS, lambda c: ("ingest",), _latents_dir, _outputs_verify),
    "teacher": StageSpec("teacher", 1, lambda c: TEACHER_KEYS, lambda c: ("ingest",), _teacher_dir, _outputs_verify),
    "text": StageSpec("text", 1, lambda c: TEXT_KEYS, lambda c: ("ingest",), _text_dir, _outputs_verify),
    "train": StageSpec("train", 1, train_keys, _train_inputs, _run_dir, _outputs_verify),
    # sample format 2: ADM's quantisation and REPA's guidance rules
    "sample": StageSpec("sample", 2, sample_keys, lambda c: ("latents", "train"), _sample_dir,
                        _outputs_verify),
    "evaluate": StageSpec("evaluate", 1, _eval_keys, _eval_inputs, _eval_dir, _outputs_verify),
}


def states(cfg: ExperimentConfig, upto: str | None = None, deep: bool = False) -> dict[str, StageState]:
    """States of every stage in order (or up to and including `upto`); `deep` rehashes outputs."""
    out: dict[str, StageState] = {}
    for name in stages(cfg):
        spec = SPECS[name]
        out[name] = evaluate_state(spec, cfg, {n: out[n] for n in spec.inputs(cfg)}, deep)
        if name == upto:
            break
    return out
