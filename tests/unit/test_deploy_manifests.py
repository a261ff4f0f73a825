"""The deployment files, parsed and checked against the project: Dockerfile, docker-compose.yml
and deploy/kubernetes/. The commands they run are the CLI's own (subcommands, flags, environment
variables, as click parses them), their probes and Services use ports the containers declare,
the pipeline files they name exist and load, and the autoscalers target the Deployments and
pipelines defined beside them."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from sluice import metrics
from sluice.cli import cli
from sluice.config.load import parse_pipeline
from sluice.config.model import PipelineConfig
from sluice.errors import ConfigError
from sluice.gateway.auth import KeyRing
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICES_SCRIPT = ROOT / "scripts" / "services"
PYPROJECT = ROOT / "pyproject.toml"

NAMESPACE = "sluice"
PIPELINES_MOUNT = "/etc/sluice/pipelines"
STORE_SECRET = ("sluice-store", "SLUICE_STORE")
COMPOSE_STORE = "postgresql://sluice:sluice@postgres:5432/sluice"
K8S_FILES = {"namespace.yaml", "configmap.yaml", "secret.yaml", "workers.yaml", "gateways.yaml",
             "service.yaml", "migrate-job.yaml", "keda.yaml"}


# -- loading --------------------------------------------------------------------------------

def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) of every YAML document in deploy/kubernetes/."""
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
                docs.append((path.name, doc))
    return docs


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    """The documents of ``kind``, by metadata.name."""
    found: dict[str, dict[str, Any]] = {}
    for file, doc in k8s_documents():
        if doc.get("kind") == kind:
            name = doc["metadata"]["name"]
            assert name not in found, f"{file}: a second {kind} named {name!r}"
            found[name] = doc
    return found


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    assert isinstance(services, dict)
    return services


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, rest = line.partition(" ")
        lines.append((instruction.upper(), rest.strip()))
    return lines


def instructions(name: str) -> list[str]:
    return [rest for instruction, rest in dockerfile() if instruction == name]


def entrypoint() -> list[str]:
    (value,) = instructions("ENTRYPOINT")
    argv = json.loads(value)  # the exec form: a JSON array
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def configmap_pipelines() -> dict[str, str]:
    """The ConfigMap mounted at /etc/sluice/pipelines: file name → text."""
    data = of_kind("ConfigMap")["sluice-pipelines"]["data"]
    assert isinstance(data, dict)
    return data


def mounted_pipeline(path: str, env: dict[str, str] | None = None,
                     monkeypatch: pytest.MonkeyPatch | None = None) -> PipelineConfig:
    """The pipeline of a file under /etc/sluice/pipelines, loaded as sluice would (handlers
    imported, ``${VAR}`` from ``env``)."""
    folder, _, name = path.rpartition("/")
    assert folder == PIPELINES_MOUNT, f"{path}: not under {PIPELINES_MOUNT}"
    text = configmap_pipelines().get(name)
    assert text is not None, f"{path}: ConfigMap sluice-pipelines has no key {name!r}"
    if monkeypatch is not None:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
    return parse_pipeline(text, path)


# -- commands -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Invocation:
    where: str  # e.g. "workers.yaml sluice-worker/worker", "docker-compose.yml worker"
    argv: tuple[str, ...]
    env: dict[str, str]  # the environment the file sets (values from Secrets: "")


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}


def pod_specs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(file and workload name, workload document, pod spec) of every Deployment and Job."""
    for file, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{file} {doc['metadata']['name']}", doc, doc["spec"]["template"]["spec"]


def k8s_invocations() -> list[Invocation]:
    return [Invocation(f"{where}/{c['name']}", tuple(c.get("command", []) + c.get("args", [])),
                       container_env(c))
            for where, _doc, pod in pod_specs() for c in pod["containers"]]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def compose_invocations() -> list[Invocation]:
    """The services built from the Dockerfile: its ENTRYPOINT, then the service's command."""
    return [Invocation(f"docker-compose.yml {name}", (*entrypoint(), *svc["command"]),
                       compose_env(svc))
            for name, svc in compose_services().items() if "build" in svc]


@dataclass(frozen=True)
class Parsed:
    path: str  # the command path: "run", "store migrate"
    command: click.Command
    params: dict[str, Any]  # as click parsed them


def envvars_of(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        value = param.envvar
        if isinstance(value, str):
            names.add(value)
        elif value is not None:
            names.update(value)
    return names


def parse(inv: Invocation) -> Parsed:
    """Resolve the subcommand of ``inv.argv`` in the click CLI and parse its arguments with it:
    an unknown command, option or environment variable fails, and so does a value click
    refuses."""
    argv = list(inv.argv)
    assert argv[:1] == ["sluice"], f"{inv.where}: the command must start with sluice: {argv}"
    command: click.Command = cli
    words: list[str] = []
    rest = argv[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, (
            f"{inv.where}: `sluice {' '.join([*words, rest[0]])}` is not a command of the CLI "
            f"(commands here: {sorted(command.commands)})")
        words.append(rest.pop(0))
        command = sub
    path = " ".join(words)
    assert not isinstance(command, click.Group), f"{inv.where}: `sluice {path}` needs a command"
    known = {opt for p in command.params if isinstance(p, click.Option)
             for opt in (*p.opts, *p.secondary_opts)}
    for arg in rest:
        flag = arg.partition("=")[0]
        assert not flag.startswith("--") or flag in known, (
            f"{inv.where}: `sluice {path}` has no option {flag} (its options: {sorted(known)})")
    for name in inv.env:
        assert not name.startswith("SLUICE_") or name in envvars_of(command), (
            f"{inv.where}: `sluice {path}` reads no environment variable {name} "
            f"(it reads: {sorted(envvars_of(command))})")
    try:
        with command.make_context(f"sluice {path}", rest) as ctx:
            params = dict(ctx.params)
    except click.ClickException as exc:
        pytest.fail(f"{inv.where}: `{shlex.join(argv)}`: {exc.format_message()}")
    return Parsed(path, command, params)


def option_value(argv: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` (``--flag V`` or ``--flag=V``), None when absent."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    return None


ALL_INVOCATIONS = [*k8s_invocations(), *compose_invocations()]


@pytest.mark.parametrize("inv", ALL_INVOCATIONS, ids=[i.where for i in ALL_INVOCATIONS])
def test_every_command_is_the_clis(inv: Invocation) -> None:
    parse(inv)


def test_the_commands_cover_migrate_run_and_serve() -> None:
    for invocations in (k8s_invocations(), compose_invocations()):
        paths = {parse(inv).path for inv in invocations}
        assert {"store migrate", "run", "serve"} <= paths


# -- Dockerfile -----------------------------------------------------------------------------

def test_dockerfile_entrypoint_is_sluice() -> None:
    assert entrypoint() == ["sluice"]
    (base,) = instructions("FROM")
    assert base.startswith("python:3.12-slim")


def test_dockerfile_installs_extras_that_exist() -> None:
    extras = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"][
        "optional-dependencies"]
    installs = [m for run in instructions("RUN")
                for m in re.findall(r"pip install [^&;]*?'\.\[([^\]]*)\]'", run)]
    assert installs, "no `pip install '.[extras]'` in the Dockerfile"
    for listed in installs:
        named = {e.strip() for e in listed.split(",")}
        assert named <= set(extras), f"extras not in pyproject.toml: {named - set(extras)}"
        assert {"kafka", "postgres"} <= named  # the Kafka pipeline; the shared store


def copied() -> dict[str, str]:
    """COPY source (in the build context) → where it lands in the image (WORKDIR applied)."""
    workdir, landed = "/", {}
    for instruction, rest in dockerfile():
        if instruction == "WORKDIR":
            workdir = str(Path(workdir) / rest)
        elif instruction == "COPY":
            *sources, dest = [w for w in rest.split() if not w.startswith("--")]
            for src in sources:
                landed[src.rstrip("/")] = str(Path(workdir) / dest)
    return landed


def test_dockerfile_runs_as_a_user_with_the_pipelines_in_its_workdir() -> None:
    (user,) = instructions("USER")
    assert user.partition(":")[0] not in ("root", "0")
    # compose runs `pipelines/<file>.yaml` from the working directory, where the handlers'
    # package `pipelines` imports from
    assert instructions("WORKDIR")[-1] == "/app"
    assert copied()["pipelines"] == "/app/pipelines"
    exposed = {p for line in instructions("EXPOSE") for p in line.split()}
    assert {"8080", "9100"} <= exposed


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".venv", ".git", ".sluice"} <= set(patterns)
    sources = list(copied())
    assert {"pyproject.toml", "README.md", "sluice", "pipelines"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        ignored = [p for p in patterns if fnmatch.fnmatch(src, p.rstrip("/"))]
        assert not ignored, f"COPY {src}: excluded from the build context by {ignored}"


# -- docker-compose.yml ---------------------------------------------------------------------

def services_script() -> tuple[list[str], dict[str, int], str]:
    """scripts/services: its service names, their ports and the default Kafka version."""
    text = SERVICES_SCRIPT.read_text(encoding="utf-8")
    names_match = re.search(r"^ALL=\(([^)]*)\)", text, re.M)
    version_match = re.search(r'KAFKA_VERSION="\$\{SLUICE_KAFKA_VERSION:-([^}]+)\}"', text)
    assert names_match and version_match
    port_of = text[text.index("port_of() {"):]
    port_of = port_of[:port_of.index("\n}")]
    ports = {name: int(port) for name, port in re.findall(r"(\w+)\) echo (\d+) ;;", port_of)}
    return names_match.group(1).split(), ports, version_match.group(1)


def test_compose_keeps_the_brokers_of_scripts_services() -> None:
    names, ports, kafka_version = services_script()
    services = compose_services()
    for name in names:
        assert name in services, f"docker-compose.yml has no service {name!r}"
        assert f"127.0.0.1:{ports[name]}:{ports[name]}" in services[name]["ports"]
        assert "build" not in services[name] and "profiles" not in services[name]
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version}"


def test_compose_postgres_is_healthchecked_and_matches_the_store_url() -> None:
    postgres = compose_services()["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert postgres["volumes"], "postgres keeps its data in a volume"
    url = urlsplit(COMPOSE_STORE)
    env = compose_env(postgres)
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
    assert (url.username, url.password, url.path) == (
        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], "/" + env["POSTGRES_DB"])


def sluice_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose_services().items() if "build" in svc}


def test_compose_sluice_services_share_the_store_and_wait_for_it() -> None:
    services = sluice_services()
    assert {"sluice-migrate", "gateway", "gateway-2", "worker"} <= set(services)
    for name, svc in services.items():
        assert svc["build"] in (".", {"context": "."}), name
        assert compose_env(svc)["SLUICE_STORE"] == COMPOSE_STORE, name
        assert svc["depends_on"]["postgres"] == {"condition": "service_healthy"}, name
        if name != "sluice-migrate":
            assert svc["depends_on"]["sluice-migrate"] == {
                "condition": "service_completed_successfully"}, name
    assert parse(invocation_of("sluice-migrate")).path == "store migrate"


def invocation_of(service: str) -> Invocation:
    (inv,) = [i for i in compose_invocations() if i.where == f"docker-compose.yml {service}"]
    return inv


def test_compose_gateways_serve_on_their_own_host_ports() -> None:
    host_ports = set()
    for name in ("gateway", "gateway-2"):
        svc = compose_services()[name]
        inv = invocation_of(name)
        parsed = parse(inv)
        assert parsed.path == "serve" and parsed.params["workers"] is False
        assert parsed.params["host"] == "0.0.0.0" and parsed.params["insecure"] is True
        (mapping,) = svc["ports"]
        host, host_port, container_port = mapping.split(":")
        assert host == "127.0.0.1"  # no auth (--insecure): loopback only
        assert int(container_port) == parsed.params["port"]
        host_ports.add(int(host_port))
        assert f":{parsed.params['port']}/readyz" in " ".join(svc["healthcheck"]["test"])
        check_compose_files(inv, parsed)
    assert host_ports == {8080, 8081}


def check_compose_files(inv: Invocation, parsed: Parsed) -> list[PipelineConfig]:
    """The pipeline files a compose service names: in the image (pipelines/ is copied to the
    working directory /app), so in the repository; loaded as sluice would."""
    files = parsed.params["files"]
    assert files, inv.where
    configs = []
    for file in files:
        assert not file.is_absolute() and file.parts[0] == "pipelines", f"{inv.where}: {file}"
        assert (ROOT / file).is_file(), f"{inv.where}: {file} is not in the repository"
        configs.append(parse_pipeline((ROOT / file).read_text(encoding="utf-8"),
                                      str(ROOT / file)))
    return configs


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"a duration in s or m: {duration!r}"
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_compose_worker_runs_three_replicas_of_an_embedded_pipeline() -> None:
    svc = compose_services()["worker"]
    inv = invocation_of("worker")
    parsed = parse(inv)
    assert parsed.path == "run" and not parsed.params["drain"]
    assert svc["deploy"]["replicas"] == 3
    assert "ports" not in svc  # three replicas cannot share a host port
    port = option_value(inv.argv, "--metrics-port")
    assert port is not None and f":{port}/healthz" in " ".join(svc["healthcheck"]["test"])
    for config in check_compose_files(inv, parsed):
        assert config.source.type == "embedded"
        assert config.handler.type == "python"
        # SIGTERM: tasks in flight get timeout_s + 1 s before the container is killed
        assert seconds(svc["stop_grace_period"]) > config.consumer.timeout_s + 1


# -- deploy/kubernetes: structure -----------------------------------------------------------

def test_k8s_directory_has_every_file() -> None:
    assert {p.name for p in K8S.glob("*.yaml")} >= K8S_FILES
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 40
    for name in K8S_FILES - {"namespace.yaml"}:
        assert name in readme, f"README.md does not say when to apply {name}"


@pytest.mark.parametrize("file_and_doc", k8s_documents(),
                         ids=[f"{f}:{d.get('kind')}/{d.get('metadata', {}).get('name')}"
                              for f, d in k8s_documents()])
def test_every_k8s_document_names_itself(file_and_doc: tuple[str, dict[str, Any]]) -> None:
    file, doc = file_and_doc
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], file
    assert isinstance(doc.get("kind"), str) and doc["kind"], file
    name = doc["metadata"]["name"]
    assert isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    if doc["kind"] == "Namespace":
        assert name == NAMESPACE
    else:
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{file}: {name}"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_deployments_select_their_own_pods_only() -> None:
    deployments = of_kind("Deployment")
    assert {"sluice-worker", "sluice-kafka-worker", "sluice-gateway"} <= set(deployments)
    for name, dep in deployments.items():
        assert dep["apiVersion"] == "apps/v1"
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector and selects(selector, dep["spec"]["template"]["metadata"]["labels"]), name
        for other_name, other in deployments.items():
            if other_name != name:
                other_labels = other["spec"]["template"]["metadata"]["labels"]
                assert not selects(selector, other_labels), f"{name} selects {other_name}'s pods"
    assert deployments["sluice-worker"]["spec"]["replicas"] == 3
    assert deployments["sluice-gateway"]["spec"]["replicas"] == 2


def declared_ports(container: dict[str, Any]) -> dict[str | int, int]:
    """A container's ports by name and by number → the number."""
    ports: dict[str | int, int] = {}
    for port in container.get("ports", []):
        number = port["containerPort"]
        assert isinstance(number, int)
        ports[number] = number
        if "name" in port:
            ports[port["name"]] = number
    return ports


def only_container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    assert isinstance(container, dict)
    return container


def test_probes_point_at_declared_ports() -> None:
    probed = 0
    for where, _doc, pod in pod_specs():
        for container in pod["containers"]:
            ports = declared_ports(container)
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                if kind in container:
                    port = container[kind]["httpGet"]["port"]
                    assert port in ports, f"{where}: {kind} on undeclared port {port!r}"
                    probed += 1
    assert probed >= 6  # two per Deployment


def test_service_targets_the_gateway_pods_and_port() -> None:
    (service,) = of_kind("Service").values()
    gateway = of_kind("Deployment")["sluice-gateway"]
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)
    for name, dep in of_kind("Deployment").items():
        if name != "sluice-gateway":
            labels = dep["spec"]["template"]["metadata"]["labels"]
            assert not selects(service["spec"]["selector"], labels), f"the Service selects {name}"
    ports = declared_ports(only_container(gateway["spec"]["template"]["spec"]))
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert port["targetPort"] in ports
    assert ports[port["targetPort"]] == 8080


def k8s_workload(name: str) -> tuple[dict[str, Any], dict[str, Any], Invocation]:
    """A Deployment's pod spec, its container and the container's invocation."""
    pod = of_kind("Deployment")[name]["spec"]["template"]["spec"]
    container = only_container(pod)
    (inv,) = [i for i in k8s_invocations() if i.where.endswith(f" {name}/{container['name']}")]
    return pod, container, inv


def mounts_configmap_at(pod: dict[str, Any], container: dict[str, Any], folder: str,
                        configmap: str) -> bool:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return any(m["mountPath"] == folder and volumes[m["name"]].get("configMap", {}).get("name")
               == configmap for m in container.get("volumeMounts", []))


def test_every_sluice_container_reads_the_store_from_its_secret() -> None:
    (secret_name, key) = STORE_SECRET
    secret = of_kind("Secret")[secret_name]
    assert key in secret["stringData"]
    assert urlsplit(secret["stringData"][key]).scheme == "postgresql"
    assert "CHANGE-ME" in secret["stringData"][key]  # a placeholder, plainly
    for where, _doc, pod in pod_specs():
        for container in pod["containers"]:
            (env,) = [e for e in container["env"] if e["name"] == "SLUICE_STORE"]
            assert env["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": key}, where


def test_gateways_serve_without_workers_with_a_keys_file_from_the_secret(
        tmp_path: Path) -> None:
    pod, container, inv = k8s_workload("sluice-gateway")
    parsed = parse(inv)
    assert parsed.path == "serve" and parsed.params["workers"] is False
    assert parsed.params["host"] == "0.0.0.0"
    assert declared_ports(container)["http"] == parsed.params["port"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    auth_file = parsed.params["auth_file"]
    assert auth_file is not None and not parsed.params["insecure"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(auth_file.parent)]
    secret_name = volumes[mount["name"]]["secret"]["secretName"]
    keys_text = of_kind("Secret")[secret_name]["stringData"][auth_file.name]
    # The placeholder keys file is refused: an unedited deployment does not serve without auth.
    (tmp_path / "keys.yaml").write_text(keys_text, encoding="utf-8")
    with pytest.raises(ConfigError, match="sha256"):
        KeyRing.load(tmp_path / "keys.yaml")
    for file in parsed.params["files"]:
        assert mounts_configmap_at(pod, container, str(file.parent), "sluice-pipelines")
        mounted_pipeline(str(file))


def test_the_migrate_job_runs_once_to_completion() -> None:
    (job,) = of_kind("Job").values()
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (inv,) = [i for i in k8s_invocations() if i.where.startswith("migrate-job.yaml ")]
    assert parse(inv).path == "store migrate"


# -- deploy/kubernetes: pipelines, workers, autoscaling -------------------------------------

def test_configmap_pipelines_are_the_repositorys_and_load() -> None:
    pipelines = configmap_pipelines()
    assert set(pipelines) == {"quickstart.yaml", "kafka_orders.yaml"}
    for name, text in pipelines.items():
        # the same pipeline as pipelines/<name> (comments aside): kept in step with it
        repo = yaml.safe_load((ROOT / "pipelines" / name).read_text(encoding="utf-8"))
        assert yaml.safe_load(text) == repo, f"configmap.yaml {name} differs from pipelines/{name}"
        mounted_pipeline(f"{PIPELINES_MOUNT}/{name}")


WORKERS = {"sluice-worker": "embedded", "sluice-kafka-worker": "kafka"}


@pytest.mark.parametrize(("deployment", "source"), WORKERS.items())
def test_workers_run_their_pipeline_with_metrics_probes_and_grace(
        deployment: str, source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pod, container, inv = k8s_workload(deployment)
    parsed = parse(inv)
    assert parsed.path == "run" and not parsed.params["drain"]
    port = option_value(inv.argv, "--metrics-port")
    assert port is not None and declared_ports(container)["metrics"] == int(port)
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] == "/healthz"
        assert declared_ports(container)[probe["port"]] == int(port)
    annotations = of_kind("Deployment")[deployment]["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    (file,) = parsed.params["files"]
    assert mounts_configmap_at(pod, container, str(file.parent), "sluice-pipelines")
    config = mounted_pipeline(str(file), inv.env, monkeypatch)
    assert config.source.type == source
    # SIGTERM: tasks in flight get timeout_s + 1 s to finish before the pod is killed
    assert pod["terminationGracePeriodSeconds"] > config.consumer.timeout_s + 1


def scaled_object_for(deployment: str) -> dict[str, Any]:
    (found,) = [so for so in of_kind("ScaledObject").values()
                if so["spec"]["scaleTargetRef"]["name"] == deployment]
    return found


def test_scaled_objects_target_the_worker_deployments() -> None:
    scaled = of_kind("ScaledObject")
    assert len(scaled) == 2
    deployments = of_kind("Deployment")
    for name, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        ref = so["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment"
        assert ref["name"] in deployments, f"{name}: no Deployment {ref['name']!r}"
        spec = so["spec"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        assert spec["cooldownPeriod"] > 0, name
        for trigger in spec["triggers"]:  # KEDA takes trigger metadata as strings only
            assert all(isinstance(v, str) for v in trigger["metadata"].values()), name
    assert {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()} == set(WORKERS)


def test_kafka_scaled_object_reads_the_lag_of_the_pipelines_group(
        monkeypatch: pytest.MonkeyPatch) -> None:
    so = scaled_object_for("sluice-kafka-worker")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    _pod, _container, inv = k8s_workload("sluice-kafka-worker")
    (file,) = parse(inv).params["files"]
    config = mounted_pipeline(str(file), inv.env, monkeypatch)
    source = config.source.config
    assert meta["bootstrapServers"] == source["brokers"] == inv.env["KAFKA_BROKERS"]
    assert meta["topic"] == source["topic"]
    assert meta["consumerGroup"] == (source["group"] or f"sluice.{config.name}")
    assert int(meta["lagThreshold"]) > 0
    assert so["spec"]["minReplicaCount"] >= 0


def test_prometheus_scaled_object_reads_the_pipelines_queue_depth() -> None:
    so = scaled_object_for("sluice-worker")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert urlsplit(meta["serverAddress"]).scheme in ("http", "https")
    _pod, _container, inv = k8s_workload("sluice-worker")
    (file,) = parse(inv).params["files"]
    config = mounted_pipeline(str(file))
    assert config.source.type == "embedded"
    query = meta["query"]
    assert re.fullmatch(r"(max|sum|avg)\(sluice_queue_depth\{pipeline=\"([^\"]+)\"\}\)", query)
    assert f'{{pipeline="{config.name}"}}' in query
    assert float(meta["threshold"]) > 0
    # the workers are the gauge's only exporters: at zero replicas nothing would scale them up
    assert so["spec"]["minReplicaCount"] >= 1


def test_queue_depth_gauge_exists_with_a_pipeline_label() -> None:
    names = {family.name for family in metrics.REGISTRY.collect()}
    assert "sluice_queue_depth" in names
    metrics.QUEUE_DEPTH.labels(pipeline="test-deploy-manifests").set(0)  # the label's name
    metrics.QUEUE_DEPTH.remove("test-deploy-manifests")
