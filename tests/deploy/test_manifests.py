"""The deployment: the agent's image build file and its Kubernetes manifests.

Every manifest is validated against the Kubernetes API's own JSON schemas (kubernetes-validate
ships them per Kubernetes release; strict: an unknown field is an error, as the API server's
strict field validation makes it). The schemas cannot say what the agent needs, so the rest of
this module checks that against the project itself: the paths the platform layer reads
(:class:`cima.platform.base.PlatformPaths`), the agent's policy parser, the package's version
and entry point (pyproject.toml), the TSS libraries tpm2-pytss links against on this machine,
and the API server's validation rules that the schemas leave out (a DaemonSet's selector must
match its template; a privileged container cannot forbid privilege escalation).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from cima.platform.base import PlatformPaths

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
EXAMPLES = DEPLOY / "examples"
CONTAINERFILE = DEPLOY / "Containerfile"
IGNOREFILE = DEPLOY / "Containerfile.dockerignore"
KUSTOMIZATION = KUBERNETES / "kustomization.yaml"
DESIGN = ROOT.parent / "shared" / "DESIGN.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

NAMESPACE = "cima-system"
# The oldest Kubernetes release the manifests target, and the newest one the installed
# kubernetes-validate has schemas for.
KUBERNETES_VERSIONS = sorted(
    {"1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2])}, key=Version
)

MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p != KUSTOMIZATION)
EXAMPLE_MANIFESTS = sorted(EXAMPLES.glob("*.yaml"))


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def objects() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in load_documents(path)]


def one(kind: str) -> dict[str, Any]:
    found = [doc for doc in objects() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBERNETES}, found {len(found)}"
    return found[0]


def daemonset() -> dict[str, Any]:
    return one("DaemonSet")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = daemonset()["spec"]["template"]["spec"]
    return spec


def agent_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def flag(args: list[str], name: str) -> str:
    """The value of ``--name VALUE`` (or ``--name=VALUE``) in an argument list."""
    for i, arg in enumerate(args):
        if arg == name:
            assert i + 1 < len(args), f"{name} has no value in {args}"
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} is not in {args}")


def agent_args() -> list[str]:
    args: list[str] = agent_container()["args"]
    return args


def mount_covering(spec: dict[str, Any], container: dict[str, Any], path: PurePosixPath) -> Any:
    """The container's mount that holds ``path`` (the deepest one) and its volume, or None."""
    best = None
    for mount in container.get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        if (path == mount_path or mount_path in path.parents) and (
            best is None or len(mount_path.parts) > len(PurePosixPath(best["mountPath"]).parts)
        ):
            best = mount
    if best is None:
        return None
    volumes = {v["name"]: v for v in spec["volumes"]}
    return best, volumes[best["name"]]


QUANTITY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity(text: str) -> float:
    """A Kubernetes resource quantity as a number (bytes; cores for CPU)."""
    match = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|k|M|G)?", text)
    assert match, f"not a quantity: {text!r}"
    number, suffix = float(match[1]), match[2]
    if suffix == "m":
        return number / 1000
    return number * QUANTITY_SUFFIXES.get(suffix or "", 1)


# ---------------------------------------------------------------------------------------------
# Schema validation


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "path", MANIFESTS + EXAMPLE_MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    documents = load_documents(path)
    assert documents, f"{path} holds no object"
    for doc in documents:
        # Raises ValidationError on a bad field, SchemaNotFoundError on an unknown kind.
        kubernetes_validate.validate(doc, version, strict=True)


def test_there_are_manifests_to_validate() -> None:
    kinds = {doc["kind"] for doc in objects()}
    assert kinds >= {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    }
    assert [p.name for p in EXAMPLE_MANIFESTS] == ["workload-pod.yaml"]


def _walk(doc: dict[str, Any], keys: list[str]) -> Any:
    node: Any = doc
    for key in keys:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets a value at a dotted path (list indices as numbers)."""
    *parents, last = path.split(".")
    return _set_key(".".join(parents), last, value)


def _set_key(parent: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets ``key`` (which may hold dots) in the mapping at ``parent``."""

    def mutate(doc: dict[str, Any]) -> None:
        node = _walk(doc, parent.split(".") if parent else [])
        if isinstance(node, list):
            node[int(key)] = value
        else:
            node[key] = value

    return mutate


def _pop(path: str) -> Callable[[dict[str, Any]], None]:
    """A mutation that removes the key at a dotted path."""
    *parents, last = path.split(".")

    def mutate(doc: dict[str, Any]) -> None:
        del _walk(doc, parents)[last]

    return mutate


CONTAINER = "spec.template.spec.containers.0"
# Each mutation makes an object that the API server would refuse; the validator must too.
BAD_MANIFESTS: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "unknown field in a container": ("DaemonSet", _set(f"{CONTAINER}.imagePullPolicyy", "Never")),
    "unknown field in the pod spec": ("DaemonSet", _set("spec.template.spec.hostPIDs", True)),
    "replicas in a DaemonSet": ("DaemonSet", _set("spec.replicas", 3)),
    "hostPID as a string": ("DaemonSet", _set("spec.template.spec.hostPID", "true")),
    "readOnly as a string": ("DaemonSet", _set(f"{CONTAINER}.volumeMounts.0.readOnly", "yes")),
    "args as one string": ("DaemonSet", _set(f"{CONTAINER}.args", "--policy /etc/cima/p.yaml")),
    "hostPath without a path": ("DaemonSet", _set("spec.template.spec.volumes.0.hostPath", {})),
    "maxUnavailable as a list": (
        "DaemonSet",
        _set("spec.updateStrategy.rollingUpdate.maxUnavailable", [1]),
    ),
    "container without a name": ("DaemonSet", _pop(f"{CONTAINER}.name")),
    "ConfigMap data not a string": ("ConfigMap", _set_key("data", "policy.yaml", 1)),
    "ClusterRole rules as a mapping": ("ClusterRole", _set("rules", {"verbs": ["get"]})),
    "binding subject without kind": ("ClusterRoleBinding", _pop("subjects.0.kind")),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_validator_refuses_bad_manifest(name: str) -> None:
    kind, mutate = BAD_MANIFESTS[name]
    doc = copy.deepcopy(one(kind))
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_strict_validation_is_what_catches_unknown_fields() -> None:
    """The same mutation passes the lenient schemas: the tests above rely on strict mode."""
    doc = copy.deepcopy(daemonset())
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Never"
    kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=False)
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------------------------------------
# Kustomization and the objects' relations


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), f"a resource is listed twice: {listed}"
    assert sorted(listed) == sorted(p.name for p in MANIFESTS)


def test_kustomization_image_is_the_daemonset_image() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    name, _, tag = agent_container()["image"].rpartition(":")
    assert [i["name"] for i in kustomization["images"]] == [name]
    assert kustomization["images"][0]["newTag"] == tag


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
def test_kustomize_builds_every_object() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    names = sorted((d["kind"], d["metadata"]["name"]) for d in rendered)
    assert names == sorted((d["kind"], d["metadata"]["name"]) for d in objects())


def test_namespaced_objects_are_in_the_agent_namespace() -> None:
    namespace = one("Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for doc in objects():
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


def test_namespace_admits_a_privileged_pod() -> None:
    labels = one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_resource_quota_admits_the_agent_priority_class() -> None:
    quota = one("ResourceQuota")
    expressions = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert {"scopeName": "PriorityClass", "operator": "In", "values": ["system-node-critical"]} in (
        expressions
    )
    assert pod_spec()["priorityClassName"] == "system-node-critical"


def test_daemonset_selector_matches_its_template() -> None:
    """An API server rule outside the schema: the selector must select the template's pods."""
    selector = daemonset()["spec"]["selector"]["matchLabels"]
    labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    assert selector
    assert selector.items() <= labels.items()


def test_service_account_and_binding() -> None:
    account = one("ServiceAccount")
    assert pod_spec()["serviceAccountName"] == account["metadata"]["name"]
    binding = one("ClusterRoleBinding")
    role = one("ClusterRole")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]


def test_cluster_role_is_read_only_on_pods_and_nodes_at_most() -> None:
    for rule in one("ClusterRole")["rules"]:
        assert rule.get("apiGroups") == [""], rule
        assert set(rule["resources"]) <= {"pods", "nodes"}, rule
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        assert "nonResourceURLs" not in rule, rule


def test_api_token_is_mounted_only_when_a_rule_needs_it() -> None:
    has_rules = bool(one("ClusterRole")["rules"])
    account = one("ServiceAccount")
    assert account.get("automountServiceAccountToken", True) is has_rules
    assert pod_spec().get("automountServiceAccountToken", True) is has_rules


def test_every_mount_has_a_volume_and_every_volume_is_mounted() -> None:
    mounted = {m["name"] for m in agent_container()["volumeMounts"]}
    volumes = [v["name"] for v in pod_spec()["volumes"]]
    assert len(volumes) == len(set(volumes))
    assert mounted == set(volumes)


# ---------------------------------------------------------------------------------------------
# The policy


def configmap_policy_text() -> str:
    configmap = one("ConfigMap")
    mount = mount_covering(pod_spec(), agent_container(), PurePosixPath(policy_path()))
    assert mount is not None
    volume = mount[1]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = str(PurePosixPath(policy_path()).relative_to(mount[0]["mountPath"]))
    text: str = configmap["data"][key]
    return text


def policy_path() -> str:
    return flag(agent_args(), "--policy")


def design_policy_example() -> dict[str, Any]:
    if not DESIGN.is_file():
        pytest.skip(reason=f"DESIGN.md is not beside the repository ({DESIGN})")
    section = DESIGN.read_text().split("## 5. Policy file", 1)[1]
    match = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert match, "no YAML example in DESIGN.md section 5"
    example: dict[str, Any] = yaml.safe_load(match[1])
    return example


def test_configmap_policy_is_the_design_example() -> None:
    assert yaml.safe_load(configmap_policy_text()) == design_policy_example()


def test_configmap_policy_lists_each_entry_once() -> None:
    measure = yaml.safe_load(configmap_policy_text())["measure"]
    for entries in (measure["system"]["processes"], measure["kubernetes"]["pods"]):
        assert entries
        assert len(entries) == len(set(entries)), entries


def test_configmap_policy_parses_with_the_agent_parser() -> None:
    from cima.agent.policy import parse_policy

    text = configmap_policy_text()
    data = yaml.safe_load(text)
    policy = parse_policy(text, source="deploy/kubernetes/configmap-policy.yaml")
    assert policy.backend == data["backend"]
    assert policy.hash_algorithm == data["hashAlgorithm"]
    system, kubernetes = data["measure"]["system"], data["measure"]["kubernetes"]
    assert policy.measure.system is not None
    assert policy.measure.system.with_parameter is system["withParameter"]
    assert tuple(policy.measure.system.processes) == tuple(system["processes"])
    assert policy.measure.container is not None
    assert policy.measure.container.isolated is data["measure"]["container"]["isolated"]
    assert policy.measure.kubernetes is not None
    assert policy.measure.kubernetes.with_parameter is kubernetes["withParameter"]
    assert tuple(policy.measure.kubernetes.pods) == tuple(kubernetes["pods"])


# ---------------------------------------------------------------------------------------------
# The DaemonSet: what the agent reads and writes on the node


@dataclass(frozen=True)
class HostPathNeed:
    path: PurePosixPath
    read_only: bool


def host_path_needs() -> dict[str, HostPathNeed]:
    """Every host path the agent uses, from the platform layer's defaults and its arguments."""
    paths = PlatformPaths()
    socket = PurePosixPath(flag(agent_args(), "--socket"))
    journal = PurePosixPath(flag(agent_args(), "--journal"))

    def need(path: Path | PurePosixPath, read_only: bool) -> HostPathNeed:
        return HostPathNeed(PurePosixPath(path), read_only)

    return {
        "securityfs": need(paths.securityfs, True),
        "IMA binary list": need(paths.ima_binary, True),
        "IMA ascii list": need(paths.ima_ascii, True),
        "TPM boot event log": need(paths.tpm_boot_log, True),
        "CCEL table": need(paths.ccel_table, True),
        "CCEL log": need(paths.ccel_data, True),
        "configfs-tsm": need(paths.configfs_tsm, False),
        "containerd socket": need(PurePosixPath("/run/containerd/containerd.sock"), True),
        "containerd task bundles": need(
            PurePosixPath("/run/containerd/io.containerd.runtime.v2.task/k8s.io"), True
        ),
        "cima socket": need(socket, False),
        "journal": need(journal, False),
    }


@pytest.mark.parametrize("what", sorted(host_path_needs()))
def test_daemonset_mounts_what_the_agent_reads(what: str) -> None:
    need = host_path_needs()[what]
    found = mount_covering(pod_spec(), agent_container(), need.path)
    assert found is not None, f"{what} ({need.path}) is not mounted"
    mount, volume = found
    assert "hostPath" in volume, f"{what} comes from {volume}, not from the node"
    # The agent uses the default paths: each host directory appears where it is on the host.
    assert volume["hostPath"]["path"] == mount["mountPath"]
    assert bool(mount.get("readOnly", False)) is need.read_only, (
        f"{what}: readOnly should be {need.read_only}"
    )


def test_host_mounts_are_directories_not_files() -> None:
    """A bind of a socket file pins its inode: a restarted server's new socket is not seen."""
    for volume in pod_spec()["volumes"]:
        if "hostPath" in volume:
            assert volume["hostPath"].get("type") in {"Directory", "DirectoryOrCreate"}, volume
            assert not volume["hostPath"]["path"].endswith(".sock"), volume


def test_agent_state_directories_are_created_on_the_node() -> None:
    """The journal and the socket directory are the agent's own: made on the first start."""
    for what in ("journal", "cima socket"):
        need = host_path_needs()[what]
        found = mount_covering(pod_spec(), agent_container(), need.path)
        assert found is not None
        assert found[1]["hostPath"]["type"] == "DirectoryOrCreate", what


def test_journal_directory_is_on_the_node_not_in_the_pod() -> None:
    journal = PurePosixPath(flag(agent_args(), "--journal"))
    found = mount_covering(pod_spec(), agent_container(), journal)
    assert found is not None
    assert "emptyDir" not in found[1]
    assert str(journal).startswith("/var/lib/"), "the journal must survive a reboot's /run"


def test_devices_and_register_attributes_come_with_privileged() -> None:
    """The runtime register is a device or a sysfs attribute: not mounted, so privileged."""
    paths = PlatformPaths()
    unmounted = [
        p
        for p in (paths.tpm_device, paths.tdx_guest_device, paths.tdx_rtmr_sysfs)
        if mount_covering(pod_spec(), agent_container(), PurePosixPath(p)) is None
    ]
    assert unmounted, "every register interface is mounted: drop privileged and say so"
    assert agent_container()["securityContext"]["privileged"] is True


def test_agent_shares_the_host_pid_namespace_only() -> None:
    spec = pod_spec()
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork", False)
    assert not spec.get("hostIPC", False)


def test_security_context() -> None:
    context = agent_container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsUser"] == 0
    # The API server refuses privileged together with allowPrivilegeEscalation: false.
    if context.get("privileged"):
        assert context.get("allowPrivilegeEscalation", True) is True


def test_resources() -> None:
    resources = agent_container()["resources"]
    assert resources["limits"]["memory"] == "128Mi"
    assert quantity(resources["limits"]["memory"]) == 128 * 2**20
    assert resources["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"])


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probe_asks_the_agent_through_its_socket(probe: str) -> None:
    command = agent_container()[probe]["exec"]["command"]
    assert command[:3] == ["cima", "client", "measurement"]
    assert flag(command, "--socket") == flag(agent_args(), "--socket")
    assert "--json" in command
    assert agent_container()[probe]["timeoutSeconds"] >= 5


def test_runs_on_control_plane_nodes() -> None:
    tolerations = pod_spec()["tolerations"]
    assert {
        "key": "node-role.kubernetes.io/control-plane",
        "operator": "Exists",
        "effect": "NoSchedule",
    } in tolerations
    assert "nodeSelector" not in pod_spec()
    assert "affinity" not in pod_spec()


def test_update_strategy() -> None:
    strategy = daemonset()["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_image_is_the_package_version() -> None:
    image = agent_container()["image"]
    name, _, tag = image.rpartition(":")
    assert name and "@" not in name
    assert tag == PYPROJECT["project"]["version"]
    assert tag != "latest"


# ---------------------------------------------------------------------------------------------
# The example workload


def example_pod() -> dict[str, Any]:
    (pod,) = load_documents(EXAMPLES / "workload-pod.yaml")
    return pod


def test_example_pod_mounts_the_socket_directory_not_the_socket() -> None:
    pod = example_pod()
    (container,) = pod["spec"]["containers"]
    socket = PurePosixPath(flag(container["command"], "--socket"))
    assert str(socket) == flag(agent_args(), "--socket")
    found = mount_covering(pod["spec"], container, socket)
    assert found is not None, "the socket is not mounted"
    mount, volume = found
    assert PurePosixPath(mount["mountPath"]) == socket.parent
    assert volume["hostPath"]["path"] == str(socket.parent)
    assert volume["hostPath"]["type"] in {"Directory", "DirectoryOrCreate"}
    # The agent's side of the same host directory.
    agent_side = mount_covering(pod_spec(), agent_container(), socket)
    assert agent_side is not None
    assert agent_side[1]["hostPath"]["path"] == volume["hostPath"]["path"]


def test_example_pod_needs_no_privilege() -> None:
    pod = example_pod()
    (container,) = pod["spec"]["containers"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert all(m.get("readOnly") for m in container["volumeMounts"])
    assert not pod["spec"].get("hostPID", False)


# ---------------------------------------------------------------------------------------------
# The Containerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int
    comments: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    image: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_containerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and the comment lines just above each."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#"):
            if not pending:
                comments.append(line.lstrip("#").strip())
            continue
        if not line:
            if not pending:
                comments = []
            continue
        if not pending:
            start = number
        continued = line.endswith("\\")
        pending.append(line[:-1].strip() if continued else line)
        if not continued:
            keyword, _, value = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), value.strip(), start, tuple(comments)))
            pending, comments = [], []
    assert not pending, "the Containerfile ends in a continued line"
    return instructions


def stages() -> list[Stage]:
    instructions = parse_containerfile(CONTAINERFILE.read_text())
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    current: list[Instruction] | None = None
    image, name = "", None
    for ins in instructions:
        if ins.keyword == "FROM":
            if current is not None:
                result.append(Stage(image, name, tuple(current)))
            words = ins.value.split()
            words = [w for w in words if not w.startswith("--platform")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m[1], m[0]), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            current = []
        elif current is None:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before FROM"
            key, _, default = ins.value.partition("=")
            global_args[key] = default
        else:
            current.append(ins)
    assert current is not None, "no FROM"
    result.append(Stage(image, name, tuple(current)))
    return result


def apt_packages(stage: Stage) -> set[str]:
    packages: set[str] = set()
    for run in stage.all("RUN"):
        for command in run.value.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def exec_form(stage: Stage, keyword: str) -> list[str]:
    (instruction,) = stage.all(keyword)
    value = json.loads(instruction.value)
    assert isinstance(value, list), f"{keyword} is not in exec form"
    return value


def test_containerfile_is_multi_stage() -> None:
    builder, final = stages()
    assert builder.name is not None
    copies_from_builder = [c for c in final.all("COPY") if f"--from={builder.name}" in c.value]
    assert [c.value.split()[1:] for c in copies_from_builder] == [["/opt/cima", "/opt/cima"]]


def test_containerfile_base_images_are_pinned_debian_12_python() -> None:
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    for stage in stages():
        repository, _, tag = stage.image.rpartition(":")
        assert repository, f"{stage.image} has no tag"
        assert tag != "latest"
        assert "$" not in stage.image, f"unresolved argument in {stage.image}"
        match = re.fullmatch(r"(\d+\.\d+)-slim-bookworm", tag)
        assert repository == "python" and match, stage.image
        assert match[1] + ".0" in requires


def test_containerfile_builds_the_package_with_the_tpm_extra() -> None:
    builder = stages()[0]
    copied = [w for c in builder.all("COPY") for w in c.value.split()[:-1]]
    assert {"pyproject.toml", "README.md", "src/"} <= set(copied)
    installs = [r.value for r in builder.all("RUN") if "pip install" in r.value]
    assert len(installs) == 1
    assert "--no-cache-dir" in installs[0]
    assert '".[tpm]"' in installs[0] or "'.[tpm]'" in installs[0]
    assert "tpm" in PYPROJECT["project"]["optional-dependencies"]


def test_containerfile_build_dependencies_stay_in_the_builder() -> None:
    builder, final = stages()
    assert {"gcc", "libtss2-dev", "pkg-config"} <= apt_packages(builder)
    runtime = apt_packages(final)
    assert not {p for p in runtime if p.endswith("-dev") or p in {"gcc", "pkg-config"}}


def test_containerfile_installs_the_tss_libraries_tpm2_pytss_links() -> None:
    """The runtime packages hold every TSS library the tpm2-pytss module here links against."""
    ldd, dpkg = shutil.which("ldd"), shutil.which("dpkg")
    if ldd is None or dpkg is None:
        pytest.skip(reason="ldd and dpkg are needed to find the TSS libraries' packages")
    try:
        import tpm2_pytss
    except ImportError:
        pytest.skip(reason="tpm2-pytss is not installed")
    modules = list(Path(tpm2_pytss.__file__).parent.glob("_libtpm2_pytss*.so"))
    assert modules, "tpm2-pytss has no compiled module"
    linked = subprocess.run(
        [ldd, str(modules[0])], capture_output=True, text=True, check=True
    ).stdout
    libraries = re.findall(r"=> (\S*libtss2-[^ ]+)", linked)
    assert libraries, linked
    owners = subprocess.run(
        # By file name: with the merged /usr, ldd's /lib path is not the one dpkg recorded.
        [dpkg, "-S", *(f"*/{Path(lib).name}" for lib in libraries)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    needed = {line.split(":", 1)[0] for line in owners.splitlines()}
    # tctildr loads the TCTI named by the agent's TPM2TOOLS_TCTI (device:) at run time.
    tcti = dict((e["name"], e.get("value")) for e in agent_container()["env"])["TPM2TOOLS_TCTI"]
    needed.add(f"libtss2-tcti-{tcti.split(':', 1)[0]}0")
    assert needed <= apt_packages(stages()[-1])


def test_containerfile_entry_point_is_the_agent() -> None:
    final = stages()[-1]
    entrypoint = exec_form(final, "ENTRYPOINT")
    assert entrypoint == ["cima", "agent"]
    assert entrypoint[0] in PYPROJECT["project"]["scripts"]
    command = exec_form(final, "CMD")
    assert command == ["--policy", "/etc/cima/policy.yaml", "--socket", "/run/cima/cima.sock"]
    # The DaemonSet's arguments replace CMD: the same policy and socket.
    for name in ("--policy", "--socket"):
        assert flag(agent_args(), name) == flag(command, name)


def test_containerfile_user_is_root_and_says_why() -> None:
    final = stages()[-1]
    (user,) = final.all("USER")
    assert user.value.split(":")[0] in {"0", "root"}
    reasons = " ".join(user.comments)
    for interface in ("securityfs", "configfs-tsm", "/proc", "containerd"):
        assert interface in reasons, f"the USER line does not say why {interface} needs root"
    assert agent_container()["securityContext"]["runAsUser"] == 0


def ignore_patterns() -> Iterator[tuple[bool, str]]:
    for raw in IGNOREFILE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            yield (line.startswith("!"), line.lstrip("!"))


def test_ignore_file_lets_in_what_the_build_copies() -> None:
    patterns = list(ignore_patterns())
    assert patterns[0] == (False, "*"), "the ignore file should start by excluding everything"
    included = {p for keep, p in patterns if keep}
    for stage in stages():
        for copy_ in stage.all("COPY"):
            if copy_.value.startswith("--from="):
                continue
            for source in copy_.value.split()[:-1]:
                assert source in included, f"COPY {source} is excluded from the context"
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
