"""The deployment files in infra/, checked offline with the tools' own schemas and parsers.

- KubeRay manifests against the operator's CRDs (../shared/data/kuberay_crds), as written and in a
  strict copy that also refuses unknown fields, as `kubectl apply` (strict field validation) does;
- the Serve config (infra/serve/tal.yaml = the RayService's serveConfigV2) against Ray Serve's own
  schema and the application's ServeArgs;
- each RayJob entrypoint against the real `tal` parser, flag by flag;
- the AWS launcher config against Ray's ray-schema.json and Ray's offline checks;
- one image and one Ray version everywhere; the MLflow manifest's wiring.

No Docker, Kubernetes or AWS is needed (or used): what those would check at run time is not checked here.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import inspect
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CRDS = ROOT.parent / "shared" / "data" / "kuberay_crds"
# Ray Serve's own models warn on import under pydantic 2 (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")
needs_crds = pytest.mark.skipif(
    not CRDS.exists(), reason=f"KubeRay CRDs not found at {CRDS} (the shared data folder beside the repository)"
)

KUBERAY = ("raycluster.yaml", "rayjob-extract.yaml", "rayjob-train.yaml", "rayjob-detect.yaml", "rayservice.yaml")
RAYJOBS = ("rayjob-extract.yaml", "rayjob-train.yaml", "rayjob-detect.yaml")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
GPU = "nvidia.com/gpu"
# What every Ray container gets: the tracking server of infra/mlflow/mlflow.yaml, and S3 keys from this Secret.
MLFLOW_URI = "http://mlflow:5000"
AWS_SECRET = "tal-aws"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each: the C loader is ~10x faster


def _load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Loader)


def _manifest(name: str) -> dict[str, Any]:
    return _load(INFRA / "kuberay" / name)


@functools.cache
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(package: str) -> str:
    """The exact version pyproject.toml pins ``package`` (extras allowed) to."""
    for requirement in _pyproject()["project"]["dependencies"]:
        if m := re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([^\s;]+)", requirement.strip()):
            return m.group(2)
    raise AssertionError(f"pyproject.toml pins no {package}==X")


# --- KubeRay manifests against the CRDs ---------------------------------------------------------
@functools.cache
def _crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    """``openAPIV3Schema`` of ``kind`` at ``api_version`` (``group/version``) from the operator's CRD."""
    crd = _load(CRDS / CRD_FILES[kind])
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, f"{CRD_FILES[kind]} does not define {group} {kind}"
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in served, f"{kind} has no version {version}; the CRD serves {sorted(served)}"
    return served[version]["schema"]["openAPIV3Schema"]


def _strict(schema: Any) -> Any:
    """A copy of ``schema`` in which objects with declared ``properties`` refuse any other key.

    The API server prunes (or, with strict field validation, refuses) fields a structural schema does
    not declare; JSON Schema allows them unless ``additionalProperties: false``, which these CRDs
    never set. Maps (``additionalProperties`` given) and ``x-kubernetes-preserve-unknown-fields``
    objects stay open.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validators(kind: str, api_version: str) -> tuple[jsonschema.Draft7Validator, jsonschema.Draft7Validator]:
    """(as the CRD says, strict) validators. OpenAPI's ``x-kubernetes-*``, ``format: int32`` and
    ``nullable`` are unknown or unchecked keywords to JSON Schema and are ignored; int-or-string
    quantities are ``anyOf: [integer, string]`` plus a pattern that applies to strings only."""
    schema = _crd_schema(kind, api_version)
    return jsonschema.Draft7Validator(schema), jsonschema.Draft7Validator(_strict(schema))


def _errors(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"/{'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors]


@needs_crds
@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_matches_the_operator_crd(name):
    doc = _manifest(name)
    assert doc["kind"] in CRD_FILES and doc["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), "metadata.name must be a DNS-1123 label"
    as_crd, strict = _validators(doc["kind"], doc["apiVersion"])
    assert _errors(as_crd, doc) == []
    assert _errors(strict, doc) == [], "a field the CRD does not declare (misspelt?): the API server would drop or refuse it"


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with ``path`` (keys and list indices joined by '/') set to ``value``, or deleted if ``value is ...``."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
    node = doc
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


@needs_crds
@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec/workerGroupSpecs/0/replicas", "two", "'two' is not of type 'integer'"),
        ("spec/headGroupSpec", ..., "'headGroupSpec' is a required property"),
        ("spec/workerGroupSpecs/1/groupName", ..., "'groupName' is a required property"),
        ("spec/autoscalerOptions/upscalingMode", "Fast", "'Fast' is not one of"),
        # a quantity must be an integer or a string: 0.5 CPU is written "500m"
        ("spec/headGroupSpec/template/spec/containers/0/resources/limits/cpu", 0.5, "0.5 is not valid under any of the given schemas"),
        ("spec/headGroupSpec/template/spec/containers/0/resources/limits/memory", "16 GB", "does not match"),
        ("spec/headGroupSpec/rayStartParams/num-cpus", 0, "0 is not of type 'string'"),
    ],
    ids=["replicas-not-int", "no-head", "no-group-name", "bad-enum", "float-quantity", "bad-quantity", "non-string-start-param"],
)
def test_crd_validation_rejects_a_broken_raycluster(path, value, expected):
    doc = _manifest("raycluster.yaml")
    as_crd, _ = _validators(doc["kind"], doc["apiVersion"])
    errors = _errors(as_crd, _set(doc, path, value))
    assert any(expected in e for e in errors), errors


@needs_crds
def test_a_misspelt_field_is_caught_only_by_the_strict_schema():
    # The CRDs declare no `additionalProperties: false`, so a typo validates as written; the strict copy
    # refuses it, as the API server's field validation would.
    doc = _manifest("raycluster.yaml")
    group = doc["spec"]["workerGroupSpecs"][0]
    typo = _set(doc, "spec/workerGroupSpecs/0/rayStartParam", group["rayStartParams"])
    as_crd, strict = _validators(doc["kind"], doc["apiVersion"])
    assert _errors(as_crd, typo) == []
    assert _errors(strict, typo) == ["/spec/workerGroupSpecs/0: Additional properties are not allowed ('rayStartParam' was unexpected)"]


# --- the clusters the manifests describe ----------------------------------------------------------
def _cluster(doc: dict[str, Any]) -> dict[str, Any]:
    match doc["kind"]:
        case "RayCluster":
            return doc["spec"]
        case "RayJob":
            return doc["spec"]["rayClusterSpec"]
        case "RayService":
            return doc["spec"]["rayClusterConfig"]
    raise AssertionError(f"not a KubeRay kind: {doc['kind']}")


def _groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """The head group, then the worker groups."""
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


def _containers(pod_spec: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    return [*(pod_spec.get("initContainers", []) if init else []), *pod_spec["containers"]]


def _gpus_per_pod(group: dict[str, Any]) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in group["template"]["spec"]["containers"])


def _gpu_capacity(cluster: dict[str, Any]) -> int:
    """GPUs of the cluster at full scale: worker pods x their GPU limits."""
    return sum(g["maxReplicas"] * _gpus_per_pod(g) for g in cluster.get("workerGroupSpecs", []))


@pytest.mark.parametrize("name", KUBERAY)
def test_every_cluster_has_gpu_workers_with_whole_gpus(name):
    cluster = _cluster(_manifest(name))
    assert _gpus_per_pod(cluster["headGroupSpec"]) == 0, "the head runs drivers, not GPU work"
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "nothing should be scheduled on the head"
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if _gpus_per_pod(g) > 0]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        for c in group["template"]["spec"]["containers"]:
            resources = c["resources"]
            # Kubernetes refuses extended resources whose request differs from the limit.
            assert resources.get("requests", {}).get(GPU, resources["limits"][GPU]) == resources["limits"][GPU]
        tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
        assert GPU in tolerated, f"group {group['groupName']} does not tolerate the usual taint of GPU nodes"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_the_long_lived_cluster_autoscales_cpu_and_gpu_groups_from_zero():
    cluster = _cluster(_manifest("raycluster.yaml"))
    assert cluster["enableInTreeAutoscaling"] is True and "autoscalerOptions" in cluster
    by_gpus = {_gpus_per_pod(g) > 0: g for g in cluster["workerGroupSpecs"]}
    assert set(by_gpus) == {False, True}, "expected one CPU and one GPU worker group"
    assert all(g["minReplicas"] == 0 < g["maxReplicas"] for g in cluster["workerGroupSpecs"])


@pytest.mark.parametrize("name", KUBERAY)
def test_ray_containers_reach_mlflow_and_s3(name):
    for group in _groups(_cluster(_manifest(name))):
        for c in _containers(group["template"]["spec"], init=False):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI", {}).get("value") == MLFLOW_URI, f"{c['name']}: MLFLOW_TRACKING_URI"
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef", {})
                assert ref == {"name": AWS_SECRET, "key": key}, f"{c['name']}: {key} must come from the Secret {AWS_SECRET}"


@pytest.mark.parametrize("name", KUBERAY)
def test_clusters_use_token_authentication(name):
    cluster = _cluster(_manifest(name))
    assert cluster["authOptions"] == {"mode": "token", "secretName": "tal-ray-auth"}


# --- one image, one Ray version -----------------------------------------------------------------
def _dockerfile_base() -> str:
    froms = re.findall(r"^FROM\s+(\S+)", (INFRA / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert len(froms) == 1, f"expected one FROM line, found {froms}"
    return froms[0]


def test_dockerfile_base_image_and_torch_match_the_pins():
    repository, tag = _dockerfile_base().split(":")
    assert repository == "rayproject/ray"
    ray_version, python, flavour = tag.split("-")
    assert ray_version == _pin("ray"), f"the base image has Ray {ray_version}, pyproject.toml pins ray=={_pin('ray')}"
    required = _pyproject()["project"]["requires-python"].removeprefix(">=")
    assert python == "py" + required.replace(".", ""), f"base image {python}, project requires Python {required}"
    assert flavour == "gpu"
    dockerfile = (INFRA / "Dockerfile").read_text()
    for package in ("torch", "torchvision"):
        installed = re.findall(rf"\b{package}==(\S+)", dockerfile)
        assert installed == [_pin(package)], f"Dockerfile installs {package} {installed}, pyproject.toml pins {_pin(package)}"
    assert "scripts/fetch_weights.py" in dockerfile and re.search(r"pip install \.", dockerfile)


def _images(doc: Any) -> list[str]:
    """Every ``image`` of every container, init container and launcher ``docker`` block in ``doc``."""
    if isinstance(doc, list):
        return [i for d in doc for i in _images(d)]
    if not isinstance(doc, dict):
        return []
    own = [doc["image"]] if isinstance(doc.get("image"), str) else []
    return own + [i for v in doc.values() for i in _images(v)]


def test_one_image_everywhere():
    kuberay = {name: set(_images(_manifest(name))) for name in KUBERAY}
    images = set().union(*kuberay.values())
    assert len(images) == 1, f"the KubeRay manifests name several images: {kuberay}"
    (image,) = images
    assert image.rsplit(":", 1)[1] == _pyproject()["project"]["version"], f"{image}: tag it with the project's version"
    assert _load(INFRA / "aws" / "cluster.yaml")["docker"]["image"] == image
    mlflow = [d for d in yaml.safe_load_all((INFRA / "mlflow" / "mlflow.yaml").read_text()) if d["kind"] == "Deployment"]
    assert set(_images(mlflow)) == {image}, "the MLflow server runs the project's image (its mlflow, psycopg2 and boto3)"


@pytest.mark.parametrize("name", KUBERAY)
def test_ray_version_matches_the_pin(name):
    assert _cluster(_manifest(name))["rayVersion"] == _pin("ray")


# --- Serve: infra/serve/tal.yaml and the RayService --------------------------------------------
def _serve_config() -> dict[str, Any]:
    return _load(INFRA / "serve" / "tal.yaml")


def _app(config: dict[str, Any]) -> dict[str, Any]:
    from jobs.serve_config import APP_NAME

    apps = {a["name"]: a for a in config["applications"]}
    assert list(apps) == [APP_NAME]
    return apps[APP_NAME]


def _deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in _app(config)["deployments"]}


def test_rayservice_serves_the_same_config_as_infra_serve():
    embedded = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    assert embedded == _serve_config(), "serveConfigV2 and infra/serve/tal.yaml differ: edit both"


def _unknown_serve_keys(config: dict[str, Any]) -> list[str]:
    """Keys Ray Serve's schema does not know (its pydantic models ignore them silently)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    def unknown(data: dict[str, Any], model, where: str) -> list[str]:
        return [f"{where}.{k}" for k in data if k not in model.model_fields]

    found = unknown(config, ServeDeploySchema, "") + unknown(config.get("http_options", {}), HTTPOptionsSchema, "http_options")
    for i, app in enumerate(config["applications"]):
        found += unknown(app, ServeApplicationSchema, f"applications[{i}]")
        for j, deployment in enumerate(app.get("deployments", [])):
            where = f"applications[{i}].deployments[{j}]"
            found += unknown(deployment, DeploymentSchema, where)
            found += unknown(deployment.get("ray_actor_options", {}), RayActorOptionsSchema, f"{where}.ray_actor_options")
            found += unknown(deployment.get("autoscaling_config", {}), AutoscalingConfig, f"{where}.autoscaling_config")
    return found


def test_serve_config_matches_ray_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    config = _serve_config()
    ServeDeploySchema.model_validate(config)  # what `serve deploy` / `serve run` do first
    assert _unknown_serve_keys(config) == []
    typo = copy.deepcopy(config)
    typo["applications"][0]["deployments"][1]["max_ongoing_request"] = 16
    assert _unknown_serve_keys(typo) == ["applications[0].deployments[1].max_ongoing_request"]


def test_serve_app_args_and_deployments_fit_the_application():
    from jobs.serve_config import APP_IMPORT_PATH, DEPLOYMENTS, ServeArgs

    app = _app(_serve_config())
    assert app["import_path"] == APP_IMPORT_PATH and app["route_prefix"] == "/"
    args = ServeArgs.model_validate(app["args"])
    assert sorted(app["args"]) == sorted(ServeArgs.model_fields), "spell out every ServeArgs field in args: the file documents them"
    deployments = _deployments(_serve_config())
    assert sorted(deployments) == sorted(DEPLOYMENTS)
    # The replicas' own cpus/gpus (which pick their device and torch threads) and the actor options must agree.
    for name in ("Detector", "VideoFeaturizer"):
        options = deployments[name]["ray_actor_options"]
        assert options["num_cpus"] == args.cpus_per_replica and options.get("num_gpus", 0) == args.gpus_per_replica, name
    assert deployments["Detector"]["max_ongoing_requests"] >= args.max_batch_size, "a batch could never fill"
    assert "autoscaling_config" in deployments["Detector"] and "num_replicas" not in deployments["Detector"]


def test_serve_args_are_refused_when_misspelt():
    from pydantic import ValidationError

    from jobs.serve_config import ServeArgs

    args = dict(_app(_serve_config())["args"])
    args["max_batchsize"] = args.pop("max_batch_size")
    with pytest.raises(ValidationError, match="max_batchsize"):
        ServeArgs.model_validate(args)


def test_rayservice_has_gpus_for_every_replica_at_full_scale():
    needed = 0
    for d in _deployments(_serve_config()).values():
        replicas = d["autoscaling_config"]["max_replicas"] if "autoscaling_config" in d else d.get("num_replicas", 1)
        needed += replicas * d.get("ray_actor_options", {}).get("num_gpus", 0)
    cluster = _cluster(_manifest("rayservice.yaml"))
    assert needed <= _gpu_capacity(cluster), f"the deployments may ask for {needed} GPUs, the cluster has {_gpu_capacity(cluster)}"
    assert cluster["enableInTreeAutoscaling"] is True


def test_serve_app_module_exposes_a_typed_builder():
    # Fails until jobs/serve.py exists. Serve validates `args` into the builder's model only when the
    # one parameter's annotation *is* the class (inspect.signature without eval_str): under
    # `from __future__ import annotations` the annotation is a string and the builder gets a plain dict.
    from jobs.serve_config import APP_IMPORT_PATH, ServeArgs

    module, attribute = APP_IMPORT_PATH.split(":")
    build_app = getattr(importlib.import_module(module), attribute)
    parameters = list(inspect.signature(build_app).parameters.values())
    assert len(parameters) == 1, "Serve calls an application builder with exactly one argument"
    assert parameters[0].annotation is ServeArgs, (
        f"annotate the builder's parameter with ServeArgs itself, not {parameters[0].annotation!r}"
    )


# --- RayJob entrypoints against the real CLI ----------------------------------------------------
def _subcommand_parser(command: str) -> argparse.ArgumentParser:
    from jobs.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def _parse_entrypoint(entrypoint: str) -> argparse.Namespace:
    """``entrypoint`` parsed as ``tal`` would; every flag spelt in full (argparse accepts any unambiguous
    prefix, so ``--num-worker`` would pass as ``--num-workers``)."""
    from jobs.cli import build_parser

    argv = shlex.split(entrypoint)
    assert argv[0] == "tal", f"the entrypoint should run the tal CLI: {entrypoint!r}"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"tal refuses the entrypoint (its error is printed above): {entrypoint!r}") from None
    known = _subcommand_parser(args.command)._option_string_actions
    flags = [a.split("=", 1)[0] for a in argv[2:] if a.startswith("-")]
    assert [f for f in flags if f not in known] == [], "abbreviated or unknown flags"
    return args


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_entrypoint_parses_with_the_tal_cli(name):
    doc = _manifest(name)
    args = _parse_entrypoint(doc["spec"]["entrypoint"])
    assert args.command == name.removeprefix("rayjob-").removesuffix(".yaml")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize(
    ("flag", "typo"),
    [("--num-workers", "--num-wrokers"), ("--num-workers", "--num-worker")],
    ids=["misspelt", "abbreviated"],
)
def test_entrypoint_check_rejects_a_bad_flag(flag, typo):
    entrypoint = _manifest("rayjob-extract.yaml")["spec"]["entrypoint"]
    assert flag in entrypoint
    with pytest.raises(AssertionError):
        _parse_entrypoint(entrypoint.replace(flag, typo))


def test_extract_job_fits_its_cluster_and_writes_to_s3():
    doc = _manifest("rayjob-extract.yaml")
    args = _parse_entrypoint(doc["spec"]["entrypoint"])
    assert args.videos.startswith("s3://") and args.out.startswith("s3://")
    assert args.num_workers * args.num_gpus <= _gpu_capacity(_cluster(doc)), "more GPU actors than the cluster has GPUs"


def test_detect_job_fits_its_cluster_and_reads_and_writes_s3():
    doc = _manifest("rayjob-detect.yaml")
    args = _parse_entrypoint(doc["spec"]["entrypoint"])
    assert args.workers is not None, "without --workers tal detect runs in the driver, on the head"
    assert args.videos.startswith("s3://") and args.output.startswith("s3://") and args.features_out.startswith("s3://"), (
        "actors on other pods read the videos; a retried job must find its shards"
    )
    cluster = _cluster(doc)
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if _gpus_per_pod(g) > 0]
    assert args.device == "cuda" and args.workers <= _gpu_capacity(cluster), "one GPU per actor: more actors than GPUs"
    for group in gpu_groups:
        (container,) = group["template"]["spec"]["containers"]
        assert args.cpus_per_worker <= float(container["resources"]["limits"]["cpu"]) / _gpus_per_pod(group), "an actor's CPUs exceed its pod's share"
    assert args.model.startswith("models:/"), "the registry's champion, resolved through MLFLOW_TRACKING_URI"


def test_train_job_fits_its_cluster_and_its_preset_takes_the_overrides():
    from jobs.train import _apply_overrides
    from tal_models.presets import load_preset

    doc = _manifest("rayjob-train.yaml")
    args = _parse_entrypoint(doc["spec"]["entrypoint"])
    assert args.workers * args.gpus_per_worker <= _gpu_capacity(_cluster(doc)), "more DDP workers than the cluster has GPUs"
    assert args.features.startswith("s3://") and args.out.startswith("s3://"), (
        "workers on other pods must reach the store and the run folders"
    )
    _apply_overrides(load_preset(args.config), tuple(args.set))  # raises UsageError on a key the preset lacks
    # --annotations is a local path: the head pod (where the driver runs) must have it mounted.
    head = _cluster(doc)["headGroupSpec"]["template"]["spec"]
    mounts = [m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])]
    assert any(Path(args.annotations).is_relative_to(m) for m in mounts), f"{args.annotations} is on no volume of the head"


# --- the AWS cluster launcher -------------------------------------------------------------------
@functools.cache
def _ray_launcher_schema() -> dict[str, Any]:
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _aws() -> dict[str, Any]:
    return _load(INFRA / "aws" / "cluster.yaml")


def test_aws_launcher_config_matches_ray_schema():
    validator = jsonschema.Draft7Validator(_ray_launcher_schema())
    config = _aws()
    assert _errors(validator, config) == []
    assert config["provider"]["type"] == "aws"
    # Ray's schema is closed (additionalProperties: false) at the top and in node types.
    assert any("min_worker" in e for e in _errors(validator, _set(config, "available_node_types/gpu/min_worker", 0)))
    assert any("'ten' is not of type 'integer'" in e for e in _errors(validator, _set(config, "max_workers", "ten")))


def test_aws_launcher_config_passes_ray_offline_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_aws())  # what `ray up` does before it talks to AWS: merge defaults, fill node types
    validate_config(config)  # schema, head type among the node types, min_workers within max_workers
    assert config["setup_commands"] == [] and config["head_setup_commands"] == [], "the launcher's default setup commands leaked in"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    for node in types.values():
        assert "IamInstanceProfile" in node["node_config"], "S3 access comes from the instance profile"
    assert re.match(r"[gp]\d", types["gpu"]["node_config"]["InstanceType"]), "the gpu node type should be a GPU instance"


# --- MLflow ---------------------------------------------------------------------------------------
def _mlflow_docs() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((INFRA / "mlflow" / "mlflow.yaml").read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) if "=" in a else (a, "") for a in args)


def test_mlflow_manifest_wiring():
    docs = _mlflow_docs()
    assert sorted(docs) == [
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("Service", "mlflow-postgres"),
        ("StatefulSet", "mlflow-postgres"),
    ]
    for workload in (docs["StatefulSet", "mlflow-postgres"], docs["Deployment", "mlflow"]):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        service = docs["Service", workload["metadata"]["name"]]
        assert service["spec"]["selector"].items() <= labels.items(), f"Service {service['metadata']['name']} selects no pod"
    assert docs["StatefulSet", "mlflow-postgres"]["spec"]["serviceName"] == "mlflow-postgres"
    postgres_image = docs["StatefulSet", "mlflow-postgres"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"postgres:\d+\.\d+", postgres_image), f"pin the postgres image: {postgres_image}"

    (server,) = docs["Deployment", "mlflow"]["spec"]["template"]["spec"]["containers"]
    assert server["command"] == ["mlflow", "server"]
    flags = _flags(server["args"])
    # The URI the Ray pods use names this Service and port, and the server accepts that Host header.
    (port,) = docs["Service", "mlflow"]["spec"]["ports"]
    host = MLFLOW_URI.removeprefix("http://")
    assert host == f"mlflow:{port['port']}" and flags["--port"] == str(port["targetPort"])
    assert host in flags["--allowed-hosts"].split(",")
    backend = re.fullmatch(r"postgresql://[^@]+@([^:/]+):(\d+)/\S+", flags["--backend-store-uri"])
    assert backend and backend.groups() == ("mlflow-postgres", "5432")
    assert flags["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in flags
    # Kubernetes leaves an undefined $(VAR) as it is: every one used must be in the container's env.
    env = {e["name"] for e in server["env"]}
    used = set(re.findall(r"\$\((\w+)\)", " ".join(server["args"])))
    assert used and used <= env, f"undefined: {used - env}"
