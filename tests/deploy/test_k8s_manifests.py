"""The Kubernetes manifests of deploy/k8s: schema-valid offline, and consistent with the server they run.

Schema validation uses the PyPI package ``kubernetes-validate`` (pinned 1.37.0), which ships the JSON schemas
of Kubernetes 1.25-1.37 inside the wheel, so no cluster and no network are needed. Strict mode rejects
unknown fields, i.e. typos such as ``readinessprobe``.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.settings import ApiSettings

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes the manifests target (every field used is GA there) and the newest bundled schema.
K8S_VERSIONS = ("1.29.0", "1.37.0")
SHUTDOWN_MARGIN_S = 15  # after the drain: the launcher stops the ranks (settle + SIGTERM grace)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


DOCUMENTS = _documents()


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in DOCUMENTS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def _server_container() -> dict[str, Any]:
    (container,) = _one("StatefulSet")["spec"]["template"]["spec"]["containers"]
    return container


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def test_manifests_define_the_serving_group_resources() -> None:
    kinds = sorted(d["kind"] for _, d in DOCUMENTS)
    assert kinds == ["ConfigMap", "PodDisruptionBudget", "Secret", "Service", "Service", "StatefulSet"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[w for w, _ in DOCUMENTS])
def test_manifest_passes_strict_schema_validation(where: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(_one("StatefulSet"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_gpus_requested_match_the_group_topology() -> None:
    container = _server_container()
    args = container["args"]
    workers = int(_arg(args, "--score-workers"))
    expected = workers + 1 if _arg(args, "--decoder") == "dedicated" else workers
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == expected
    assert resources["requests"]["nvidia.com/gpu"] == expected


def test_probes_use_readyz_for_readiness_and_healthz_for_liveness() -> None:
    container = _server_container()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": ApiSettings.model_fields["port"].default}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_grace_period_covers_prestop_and_the_drain_timeout() -> None:
    pod = _one("StatefulSet")["spec"]["template"]["spec"]
    container = _server_container()
    drain_s = float(_env(container)["TALKINGMACHINES_DRAIN_TIMEOUT_S"]["value"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    prestop_s = float(command[1])
    assert pod["terminationGracePeriodSeconds"] >= prestop_s + drain_s + SHUTDOWN_MARGIN_S


def test_pod_runs_as_the_images_non_root_user() -> None:
    pod = _one("StatefulSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert _server_container()["securityContext"]["allowPrivilegeEscalation"] is False


def test_selectors_of_services_and_pdb_match_the_pod_labels() -> None:
    statefulset = _one("StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    selectors = [
        statefulset["spec"]["selector"]["matchLabels"],
        _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        _one("Service", "talkingmachines")["spec"]["selector"],
        _one("Service", "talkingmachines-groups")["spec"]["selector"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()


def test_per_group_service_is_headless_and_keeps_unready_groups_addressable() -> None:
    groups = _one("Service", "talkingmachines-groups")
    assert groups["spec"]["clusterIP"] == "None"
    assert groups["spec"]["publishNotReadyAddresses"] is True
    assert _one("StatefulSet")["spec"]["serviceName"] == "talkingmachines-groups"


def test_secret_references_resolve_to_keys_of_the_secret() -> None:
    secret = _one("Secret")
    for entry in _env(_server_container()).values():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"]


def test_configmap_and_secret_load_as_valid_server_settings(tmp_path: Path) -> None:
    configmap = _one("ConfigMap")
    (volume,) = [
        v for v in _one("StatefulSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    ]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    config_path = _arg(_server_container()["args"], "--config")
    mount = next(m for m in _server_container()["volumeMounts"] if m["name"] == "config")
    file_name = Path(config_path).relative_to(mount["mountPath"]).as_posix()
    toml_text = configmap["data"][file_name]
    tomllib.loads(toml_text)
    (tmp_path / file_name).write_text(toml_text)
    secret = _one("Secret")["stringData"]
    environ = {
        name: secret[e["valueFrom"]["secretKeyRef"]["key"]]
        for name, e in _env(_server_container()).items()
        if "valueFrom" in e
    }
    settings = ApiSettings.load(tmp_path / file_name, environ)
    assert settings.host == "0.0.0.0"
    assert settings.api_key is not None and settings.api_key.get_secret_value() == secret["api-key"]
    assert settings.livekit_api_secret is not None


def test_container_args_parse_with_the_serve_command() -> None:
    from server import cli

    commands = cli._build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    commands["serve"].parse_args(_server_container()["args"])
