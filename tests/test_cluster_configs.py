"""Cluster configs: the Ray launcher YAML and the KubeRay manifests, checked as their consumers do.

- ``cluster/aws-gpu.yaml`` goes through Ray's own ``prepare_config`` + ``validate_config``
  (what ``ray up`` runs before it talks to AWS).
- Every manifest under ``cluster/kuberay/`` is validated against the OpenAPI v3 schema of the
  real KubeRay CRDs in ``../shared/data/kuberay-crds/``, with the Kubernetes API server's
  semantics added: unknown fields are errors (strict field validation), int-or-string,
  int32/int64 ranges, ``x-kubernetes-list-type`` map/set uniqueness; manifests may not set a
  field that carries a CEL rule (``x-kubernetes-validations``), since those are not evaluated
  here. Ray's KubeRay autoscaler then derives its node types from the RayCluster spec.
- Policy: our Ray version everywhere, token auth on, a head that runs no tasks, GPU groups that
  scale from zero, entrypoints and configs that exist, no secrets in any file.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"
CRD_DIR = REPO.parent / "shared" / "data" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _ray_version() -> str:
    """The Ray version pinned in pyproject.toml."""
    match = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins no ray version"
    return match.group(1)


RAY_VERSION = _ray_version()


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.name}#{i}", doc))
    return docs


MANIFESTS = _manifests()


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


# --------------------------------------------------------------------------- CRD schemas


def _strict(node: Any) -> Any:
    """Convert a CRD structural schema to JSON Schema with the API server's semantics."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # strict field validation: unknown fields fail
    return out


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()

    @checker.checks("int32")
    def _int32(value: Any) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value: Any) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    return checker


def _crd_schema(kind: str) -> dict:
    # Fail, never skip: a missing CRD copy would otherwise turn every schema check green.
    assert CRD_DIR.is_dir(), (
        f"KubeRay CRDs not found at {CRD_DIR}: they live in ../shared/data/kuberay-crds next to "
        "the repository checkout (CI checks shared/ out beside the repository)"
    )
    missing = [f for f in CRD_FILES.values() if not (CRD_DIR / f).is_file()]
    assert not missing, f"KubeRay CRD files missing from {CRD_DIR}: {missing}"
    return _load_crd(kind)


@functools.cache
def _load_crd(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return {
        "group": crd["spec"]["group"],
        "version": version["name"],
        "raw": version["schema"]["openAPIV3Schema"],
        "validator": jsonschema.Draft7Validator(
            _strict(version["schema"]["openAPIV3Schema"]), format_checker=_format_checker()
        ),
    }


def _k8s_semantics(schema: dict, value: Any, path: str, errors: list[str]) -> None:
    """Checks that JSON Schema cannot express: list-type map/set uniqueness, CEL-guarded fields."""
    if "x-kubernetes-validations" in schema:
        rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
        errors.append(f"{path}: carries CEL rules that are not evaluated here: {rules}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, item in value.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                _k8s_semantics(sub, item, f"{path}.{key}", errors)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(item.get(k) for k in keys) for item in value]
            if len(seen) != len(set(seen)):
                errors.append(f"{path}: duplicate entries for map keys {keys}")
        elif list_type == "set" and len({repr(v) for v in value}) != len(value):
            errors.append(f"{path}: duplicate entries in a set")
        for i, item in enumerate(value):
            _k8s_semantics(schema["items"], item, f"{path}[{i}]", errors)


def validate_manifest(doc: dict) -> None:
    """Validate one manifest as the API server would; raise ``AssertionError`` listing errors."""
    kind = doc.get("kind")
    assert kind in CRD_FILES, f"unknown kind {kind!r}"
    crd = _crd_schema(kind)
    assert doc.get("apiVersion") == f"{crd['group']}/{crd['version']}", doc.get("apiVersion")
    name = doc.get("metadata", {}).get("name", "")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in crd["validator"].iter_errors(doc)
    ]
    _k8s_semantics(crd["raw"], doc, "", errors)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_manifest_validates_against_kuberay_crd(name: str, doc: dict) -> None:
    validate_manifest(doc)


def test_crd_validation_rejects_bad_manifests() -> None:
    """The validator is not vacuous: a typo, a wrong type and a duplicate container fail."""
    doc = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    typo = copy.deepcopy(doc)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    too_big = copy.deepcopy(doc)
    too_big["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 2**40
    duplicate = copy.deepcopy(doc)
    containers = duplicate["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))
    bad_quantity = copy.deepcopy(doc)
    bad_quantity["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]["cpu"] = "four"
    for bad, expected in [
        (typo, "minReplica"),
        (wrong_type, "maxReplicas"),
        (too_big, "maxReplicas"),
        (duplicate, "duplicate"),
        (bad_quantity, "cpu"),
    ]:
        with pytest.raises(AssertionError, match=expected):
            validate_manifest(bad)


def test_kuberay_manifests_exist() -> None:
    kinds = sorted(doc["kind"] for _, doc in MANIFESTS)
    assert kinds == ["RayCluster", "RayJob"]


# --------------------------------------------------------------------------- KubeRay policy


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return pods


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_kuberay_pins_ray_version_and_turns_auth_on(name: str, doc: dict) -> None:
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION
    for group, pod in _pod_templates(spec):
        for container in pod["containers"]:
            assert f"ray{RAY_VERSION}" in container["image"], (group, container["image"])
    assert spec["authOptions"]["mode"] == "token"
    # The job API stays inside the cluster network.
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_kuberay_head_cpu_only_and_gpu_group_from_zero(name: str, doc: dict) -> None:
    spec = _cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get(section, {})
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
        assert group["maxReplicas"] >= 1
        assert any(k.startswith("accelerator_type:") for k in group["resources"])
        tolerations = group["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        accelerator = next(k for k in group["resources"] if k.startswith("accelerator_type:"))
        selector = group["template"]["spec"]["nodeSelector"]  # pinned to that GPU's nodes
        assert any(accelerator.split(":")[1] in v for v in selector.values()), selector
    # CPU-only stages must not start GPU nodes: a CPU group from zero (the head has 0 CPUs)
    cpu_groups = [g for g in spec["workerGroupSpecs"] if g not in gpu_groups]
    assert cpu_groups, "no CPU worker group"
    for group in cpu_groups:
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
        assert group["maxReplicas"] >= 1


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_ray_autoscaler_reads_the_node_types(name: str, doc: dict) -> None:
    """Ray's KubeRay autoscaler derives the same picture from the RayCluster spec."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}}
    cr["metadata"]["namespace"] = "default"
    cr["spec"] = _cluster_spec(doc)
    config = _derive_autoscaling_config_from_ray_cr(cr)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and not head["resources"].get("GPU")
    gpu = types["gpu-a10g"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] == 8
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["accelerator_type:A10G"] == 1
    assert gpu["resources"]["CPU"] == 14


def test_rayjob_runs_the_pipeline_and_shuts_down() -> None:
    (doc,) = [d for _, d in MANIFESTS if d["kind"] == "RayJob"]
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    # KubeRay builds `ray job submit --address … --no-wait -- <entrypoint>` and runs it with
    # `bash -ce`, the entrypoint pasted unquoted: a shell operator would end the Ray job there
    # (`cd x && python …` submits only `cd x`; the rest runs in the submitter pod).
    command = f"ray job submit --address http://head:8265 --no-wait -- {spec['entrypoint']}"
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    operators = [t for t in tokens if set(t) <= set("&|;<>()")]
    assert not operators, f"entrypoint holds shell operators {operators}: {spec['entrypoint']!r}"
    words = tokens[tokens.index("--") + 1 :]
    assert words[0] in ("python", "python3") and "cd" not in words, words
    image_root = "/home/ray/mllm-msr/"  # where cluster/Dockerfile copies the repository
    script = words[1]
    assert script == image_root + "jobs/pipeline.py", script
    config = words[words.index("--config") + 1]
    assert config.startswith(image_root) and (REPO / config[len(image_root) :]).is_file(), config
    overrides = [w for w in words if w.startswith("run_dir=")]
    assert overrides and overrides[0].startswith("run_dir=s3://")
    # The raw data are read by ingest tasks on any node: object storage, not the image's disk.
    assert [w for w in words if w.startswith("ingest.root=")][0].startswith("ingest.root=s3://")


def test_documented_commands_name_existing_jobs_and_configs() -> None:
    """Every ``jobs/*.py`` and ``configs/*.yaml`` that a cluster file or command names exists."""
    named = set()
    for path in [*_shipped_files(), CLUSTER / "README.md"]:
        named.update(re.findall(r"\b(?:jobs/\w+\.py|configs/[\w.-]+\.yaml)\b", path.read_text()))
    assert "jobs/pipeline.py" in named
    assert [n for n in sorted(named) if not (REPO / n).is_file()] == []


def test_dockerfile_builds_the_image_the_manifests_name() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-py311-gpu$", text, re.M)
    assert '".[gpu]"' in text
    images = {
        c["image"]
        for _, doc in MANIFESTS
        for _, pod in _pod_templates(_cluster_spec(doc))
        for c in pod["containers"]
    }
    assert len(images) == 1
    (image,) = images
    assert f"mllm-msr:{image.split(':', 1)[1]}" in text  # the tag the build command writes


# --------------------------------------------------------------------------- cluster launcher


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_config_passes_ray_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_launcher())
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    bad = _launcher()
    bad["available_node_types"]["gpu_a10g"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(bad))


def test_launcher_head_runs_no_tasks_and_gpu_group_scales_from_zero() -> None:
    config = _launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    for node_type in gpu:
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1
        assert any(k.startswith("accelerator_type:") for k in node_type["resources"])
    cpu = [t for t in workers if not t["resources"].get("GPU") and t["resources"].get("CPU")]
    assert cpu, "no CPU worker type: CPU-only stages would start GPU nodes"
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in cpu)


def test_launcher_token_auth_install_and_storage() -> None:
    config = _launcher()
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for command in ray_starts:
        assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=" in command
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    # The token reaches the nodes from a local file outside the repository.
    token_src = config["file_mounts"]["~/.ray/auth_token"]
    assert token_src.startswith("~/") and not (REPO / token_src).exists()
    assert any("scripts/install.sh gpu" in c for c in config["setup_commands"])
    # Only what the install needs is mounted (never the venv, caches or runs: `ray up` hashes
    # every mounted file), and every mounted repository path exists.
    for remote, local in config["file_mounts"].items():
        if remote.startswith("~/mllm-msr/"):
            assert local == "./" + remote.removeprefix("~/mllm-msr/")
            assert local not in ("./.venv", "./.cache", "./runs", "./.git", ".")
            assert (REPO / local).exists(), local
    assert "run_dir=s3://" in LAUNCHER.read_text()
    assert "ingest.root=s3://" in LAUNCHER.read_text()


# --------------------------------------------------------------------------- secrets

SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"(?i)aws_secret_access_key\s*[:=]",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "long hex or base64 token": r"\b[0-9a-fA-F]{40,}\b|\b[A-Za-z0-9+/]{60,}={0,2}",
    "literal Ray token": r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9]",
    "password": r"(?i)\bpassword\s*[:=]\s*['\"]?\w",
    "GitHub/HF/Slack token": r"\b(ghp_|github_pat_|hf_[A-Za-z]{10}|xox[bp]-)",
}


def _shipped_files() -> list[Path]:
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    files += [REPO / "scripts" / "local_cluster.sh", REPO / "scripts" / "_local_cluster.py"]
    return files


def test_no_secrets_in_cluster_files() -> None:
    hits = []
    for path in _shipped_files():
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            for match in re.finditer(pattern, text):
                hits.append(f"{path.relative_to(REPO)}: {what}: {match.group(0)[:20]}...")
    assert not hits, "\n".join(hits)
    # The detector itself works.
    assert re.search(SECRET_PATTERNS["AWS access key id"], "AKIA" + "ABCDEFGHIJKLMNOP")
    assert re.search(SECRET_PATTERNS["literal Ray token"], "RAY_AUTH_TOKEN=abc123")
    assert not re.search(SECRET_PATTERNS["literal Ray token"], "RAY_AUTH_TOKEN=$(kubectl get)")
