"""Config loading: TOML + --set overrides, and one-line errors with exit code 2."""

from __future__ import annotations

import pytest

from jobs.stage import UsageError
from schemas.loading import ConfigError, load_config, parse_value
from tests.conftest import ROOT, repa


def test_overrides_parse_toml_literals_and_fall_back_to_strings():
    cfg = load_config(None, ["workdir=/tmp/x", "train.steps=12", "align.student_layers=[1, 2]", "align.teacher_layers=[10, 11]",
                             "train.compile=true", "teacher.name=dinov2_vitl14"])
    assert cfg.workdir == "/tmp/x"
    assert cfg.train.steps == 12
    assert cfg.align.student_layers == [1, 2]
    assert cfg.train.compile is True
    assert cfg.teacher.name == "dinov2_vitl14"
    assert parse_value("1e-4") == pytest.approx(1e-4)
    assert parse_value("hello world") == "hello world"


def test_string_field_keeps_numeric_looking_text():
    assert load_config(None, ["train.name=007"]).train.name == "007"


def test_demo_config_validates():
    cfg = load_config("configs/demo.toml")
    assert cfg.data.source == "fashion-mnist" and cfg.train.align == "urepa"


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.stepz=3", ["train.stepz", "unknown key", "steps"]),
        ("train.steps=many", ["train.steps", "'many'"]),
        ("train.align=repb", ["train.align", "'repb'", "'urepa'", "'haste'"]),
        ("nosuch.key=1", ["nosuch.key", "unknown key"]),
        ("sample.cfg_scale=-1", ["sample.cfg_scale", "-1", "greater than or equal to 0"]),
    ],
)
def test_bad_override_is_a_config_error_naming_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("configs/demo.toml", [override])
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_guidance_interval_must_be_ordered():
    with pytest.raises(ConfigError, match="guidance_low .* must not exceed"):
        load_config(None, ["sample.guidance_high=0.5", "sample.guidance_low=0.7"])


def test_unknown_key_in_file_is_reported(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('workdir = "w"\n[train]\nalign = "repa"\nbogus = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key 'train.bogus'"):
        load_config(path)


@pytest.mark.parametrize(
    "override",
    ["train.bogus=1", "train.steps=abc", "train.align=nope"],
)
def test_cli_exits_2_with_one_line(override, tmp_path):
    proc = repa("status", "--config", "configs/demo.toml", "--set", f"workdir={tmp_path}", "--set", override)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_exits_2(tmp_path):
    proc = repa("status", "--config", str(tmp_path / "none.toml"))
    assert proc.returncode == 2 and "not found" in proc.stderr


@pytest.mark.parametrize("recipe", ["repa", "urepa", "haste"])
def test_paper_recipes_pass_the_checks_before_compute(recipe):
    """The ImageNet-256 recipes fit SD-VAE latents [8, 32, 32] and DINOv2-B/14's geometry at 224px."""
    from jobs.checks import check_manifests, model_kwargs

    cfg = load_config(ROOT / "configs" / f"imagenet256-{recipe}.toml")
    latents = {"latent_shape": [8, 32, 32], "num_classes": 1000}
    teacher = {"dim": 768, "grid": [16, 16], "heads": 12, "depth": 12, "cache": cfg.teacher.cache,
               "hidden_layer": cfg.teacher.hidden_layer}
    kwargs = model_kwargs(cfg, latents)
    assert kwargs["input_size"] == 32 and kwargs["in_channels"] == 4
    check_manifests(cfg, latents, teacher, kwargs)  # raises UsageError on a mismatch
    with pytest.raises(UsageError, match="model.num_classes"):
        check_manifests(cfg, {**latents, "num_classes": 1001}, teacher, kwargs)
    if recipe == "haste":
        with pytest.raises(UsageError, match="teacher.cache"):
            check_manifests(cfg, latents, {**teacher, "cache": "tokens"}, kwargs)


def test_stage_jobs_are_siblings():
    # A stage module may use the stage framework (jobs.stage, jobs.run, jobs.layout, jobs.lock) and the
    # library, never another stage: shared helpers live in the framework or in pipeline/.
    import ast

    framework = {"jobs", "jobs.stage", "jobs.run", "jobs.layout", "jobs.lock", "jobs.checks"}
    stages = {"ingest", "encode", "teacher", "text", "train", "sample", "evaluate", "compare", "report"}
    for name in stages:
        tree = ast.parse((ROOT / "jobs" / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jobs"):
                imported |= {node.module} if node.module != "jobs" else {f"jobs.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("jobs")}
        assert imported <= framework, f"jobs/{name}.py imports {sorted(imported - framework)}"


def test_batch_must_split_over_workers_and_micro_batches():
    with pytest.raises(ConfigError, match="must split evenly"):
        load_config(str(ROOT / "configs" / "demo.toml"), ["train.num_workers=3"])
    cfg = load_config(str(ROOT / "configs" / "demo.toml"), ["train.num_workers=2", "train.grad_accum=2"])
    assert cfg.train.batch_size % 4 == 0


def test_cool_down_hashes_the_run_length_and_leaves_older_run_names_alone():
    from jobs.layout import run_name, train_keys

    base = load_config(ROOT / "configs" / "demo.toml", ["train.cooldown_steps=0"])
    longer = base.model_copy(update={"train": base.train.model_copy(update={"steps": base.train.steps * 2})})
    assert run_name(longer) == run_name(base)  # constant LR: a longer run continues the same one
    assert "train.cooldown_steps" not in train_keys(base)  # off: the fingerprint of older runs holds
    cool = base.model_copy(update={"train": base.train.model_copy(update={"cooldown_steps": 100})})
    cool_longer = cool.model_copy(update={"train": cool.train.model_copy(update={"steps": base.train.steps * 2})})
    assert "train.cooldown_steps" in train_keys(cool)
    assert run_name(cool) != run_name(base)
    assert run_name(cool_longer) != run_name(cool)  # the schedule depends on the length


def test_library_modules_stay_short():
    # One concept per module: a library module past ~400 lines holds more than one and is split by role
    # (as the Zarr store is: layout, writer, reader, verification).
    limit = 420
    long = {str(p.relative_to(ROOT)): n for d in ("pipeline", "schemas") for p in sorted((ROOT / d).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > limit}
    assert not long, f"library modules over {limit} lines: {long}"
