"""A 2-node Ray cluster on this machine (Ray's own `ray.cluster_utils.Cluster`: two raylets, each node
with its own working copy of an object-store workdir on a real S3 server), driven through `RAY_ADDRESS`
as a real cluster is: the store fan-out, a 2-worker training run and the sampling fan-out spread over
both nodes, against one process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, repa
from tests.s3server import s3_server
from tests.test_jobs_e2e import TINY, cfg_of, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(Ray address, AWS environment, {node: its working-copy root}); each node has 2 CPUs."""
    ray_utils = pytest.importorskip("ray.cluster_utils")
    tmp = tmp_path_factory.mktemp("cluster")
    saved = dict(os.environ)
    with s3_server() as aws:
        os.environ.update(aws, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
        os.environ["REPA_STAGING"] = str(tmp / "node-a")  # what the head node's processes inherit
        c = ray_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_a": 1}})
        os.environ["REPA_STAGING"] = str(tmp / "node-b")
        c.add_node(num_cpus=2, resources={"node_b": 1})
        c.wait_for_nodes()
        os.environ.clear()
        os.environ.update(saved)
        try:
            yield c.address, aws, {"a": tmp / "node-a", "b": tmp / "node-b"}
        finally:
            c.shutdown()


def test_store_fan_out_and_two_workers_over_two_nodes_equal_one_process(tmp_path, cluster):
    address, aws, nodes = cluster
    local = tiny_config(tmp_path, "local")
    for command in ("features", "train"):
        out = repa(command, "-c", str(local))
        assert out.returncode == 0, out.stderr[-3000:]

    config = tmp_path / "cluster.toml"
    config.write_text(TINY.format(workdir=f"s3://repa/{tmp_path.name}"))
    sets = ["--set", "stores.launcher=ray", "--set", "stores.num_workers=4",
            "--set", "train.launcher=ray", "--set", "train.num_workers=2", "--set", "train.use_gpu=false"]
    env = {**aws, "RAY_ADDRESS": address, "REPA_STAGING": str(tmp_path / "driver")}
    for command in ("features", "train"):
        out = repa(command, "-c", str(config), *sets, env=env)
        assert out.returncode == 0, out.stderr[-4000:]

    # both nodes ran tasks and training workers: each pulled what it read into its own working copy
    for root in nodes.values():
        assert list(root.rglob("store.zarr/zarr.json")), f"no task ran on the node of {root}"
        assert list(root.rglob("ingest/shard-*.tar")) and not list(root.rglob("ingest/index.tsv"))  # its shards only

    os.environ.update(env)
    try:
        from jobs.layout import states
        from jobs.run import pull_all
        from pipeline.stores.zarr_store import StoreReader

        cfg = cfg_of(config, *sets[1::2])
        pull_all(cfg, bulk=True)
        there = states(cfg)
    finally:
        for k in env:
            os.environ.pop(k, None)
    assert {there[s].state for s in ("latents", "teacher", "train")} == {"up-to-date"}
    assert there["teacher"].manifest.stats["launcher"] == "ray"
    here = states(cfg_of(local))
    idx = np.arange(64)
    for store, names in (("latents", ("moments", "labels")), ("teacher", ("tokens", "labels"))):
        a, b = StoreReader(here[store].path / "store.zarr"), StoreReader(there[store].path / "store.zarr")
        for name in names:
            np.testing.assert_array_equal(a.read(name, idx), b.read(name, idx))

    from safetensors.torch import load_file

    one, two = (load_file(Path(s["train"].path) / "ema.safetensors") for s in (here, there))
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-5)

    # sampling fanned out over both nodes draws the images one process draws from the same weights
    fanned = repa("sample", "-c", str(config), *sets, "--set", "sample.launcher=ray", "--set", "sample.num_workers=2",
                  env=env)
    assert fanned.returncode == 0, fanned.stderr[-4000:]
    drawn = np.load(_pulled(env, cfg, "sample") / "samples.npz")["arr_0"]
    alone = repa("sample", "-c", str(config), *sets, "--force", env={**env, "REPA_STAGING": str(tmp_path / "alone")})
    assert alone.returncode == 0, alone.stderr[-4000:]
    np.testing.assert_array_equal(drawn, np.load(_pulled(env, cfg, "sample") / "samples.npz")["arr_0"])
    assert any(root.rglob(".parts-*/batch-*.npz") for root in nodes.values())  # batches drawn on the nodes


def _pulled(env: dict, cfg, stage: str) -> Path:
    """The output directory of `stage`, pulled into a fresh working copy."""
    import tempfile

    from jobs.layout import states
    from jobs.run import pull_all

    saved = dict(os.environ)
    os.environ.update(env, REPA_STAGING=tempfile.mkdtemp(prefix="reader-"))
    try:
        pull_all(cfg, bulk=True)
        return Path(states(cfg)[stage].path)
    finally:
        os.environ.clear()
        os.environ.update(saved)
