"""Cluster definitions: ray_config.yaml against Ray's own schema, the KubeRay manifests, the
Dockerfile and the local multi-node cluster script (without starting anything)."""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def test_ray_config_validates_against_ray_s_schema():
    import ray
    import ray.autoscaler

    jsonschema = pytest.importorskip("jsonschema")
    config = load(ROOT / "ray_config.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # Ray's own preparation (provider defaults merged in) and validation, as `ray up` does.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t, spec in types.items() if spec["resources"].get("GPU", 0) > 0]
    cpu = [t for t, spec in types.items()
           if spec["resources"].get("CPU", 0) > 0 and not spec["resources"].get("GPU")]
    assert gpu and cpu, "needs a CPU and a GPU worker type"
    # Every node installs this project from where file_mounts puts it.
    target = next(dst for dst, src in config["file_mounts"].items() if src == ".")
    for commands in (config["head_setup_commands"], config["worker_setup_commands"],
                     *(spec["worker_setup_commands"] for spec in types.values()
                       if "worker_setup_commands" in spec)):
        assert any("pip install" in c and target in c for c in commands), commands
        assert any("torch==2.13.0" in c for c in commands), commands  # never an unpinned torch
    # Images carry the Ray this project is developed with.
    images = [config["docker"]["image"], *(spec["docker"]["worker_image"] for spec in types.values()
                                            if "docker" in spec)]
    assert all(f":{ray.__version__}-" in image for image in images), images


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_rayjob_runs_the_train_entrypoint():
    import ray

    job = load(KUBERAY / "rayjob-train.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/train.py")
    assert (ROOT / "jobs" / "train.py").exists()
    # The job's arguments are a valid `dundi train` command line.
    from dundi.cli.main import build_parser

    args = build_parser().parse_args(["train", *argv[2:]])
    assert args.workers >= 2 and args.storage and args.out.startswith("/data/")
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["DUNDI_DATA_DIR"].startswith("/data/")
    for container in _containers(spec["rayClusterSpec"]):
        assert container["image"].startswith("dundi:")
        assert any(m["mountPath"] == "/data" for m in container["volumeMounts"])
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(spec["rayClusterSpec"]))


def test_kuberay_rayservice_serves_the_same_app_as_serve_config():
    import ray

    svc = load(KUBERAY / "rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    reference = ROOT / "cluster" / "serve_config.yaml"
    if reference.exists():  # written by the Serve side of the project
        assert app["import_path"] == load(reference)["applications"][0]["import_path"]
    pytest.importorskip("ray.serve")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    assert app["args"]["run"].startswith("/data/runs/")
    assert svc["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    claim = load(KUBERAY / "storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for container in _containers(svc["spec"]["rayClusterConfig"]):
        assert any(v["mountPath"] == "/data" for v in container["volumeMounts"])


def test_dockerfile_installs_the_project_and_pinned_torch():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    import ray

    assert f"rayproject/ray:{ray.__version__}-" in text
    assert 'torch==2.13.0' in text and "pip install" in text
    for path in ("dundi", "jobs", "pyproject.toml"):
        assert path in text


def test_local_cluster_script_help_and_empty_state(tmp_path):
    script = ROOT / "cluster" / "local_cluster.py"
    for cmd in (["--help"], ["up", "--help"], ["down", "--help"]):
        proc = subprocess.run([sys.executable, str(script), *cmd], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
    env = {**os.environ, "DUNDI_CLUSTER_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script), "status"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1 and "no local cluster" in proc.stdout
    proc = subprocess.run([sys.executable, str(script), "down"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0 and "no local cluster" in proc.stdout
