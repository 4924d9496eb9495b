"""cluster/ and docs/cluster.md stay true to the code: they parse, name real jobs with valid flags and config
keys, agree on the Ray version, carry the KubeRay fields they need, and never hold a literal credential.

Pure parsing and validation: no Ray is started (cluster/local.sh runs against a stub ``ray``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mer.cli import build_parser, resolve_config
from mer.config import ConfigError, load_config
from mer.store.redact import SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
OVERLAY = CLUSTER / "ray_config.gpu.yaml"
DOCS = ROOT / "docs" / "cluster.md"
LOCAL_SH = CLUSTER / "local.sh"
DOCKERFILE = CLUSTER / "Dockerfile"
EXPECTED_YAMLS = {"aws-gpu.yaml", "ray_config.gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-extract.yaml",
                  "kuberay/rayjob-train.yaml"}
PLACEHOLDERS = {"key=value"}  # the flag's own description (`--set key=value`)
INVALID_EXAMPLES = {"train.not_a_key"}  # README's example of the error an unknown key gives
QUOTES = "'\""
SECTIONS = ("storage", "extract", "enrich", "train", "labels", "relabel", "pseudolabel", "score")  # `ray.` is too ambiguous


def _yamls() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _text_files() -> list[Path]:
    """Every file whose commands and config keys must match the code (README.md included)."""
    return [*_yamls(), LOCAL_SH, DOCKERFILE, DOCS, ROOT / "README.md"]


def _manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]


def _cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of the RayCluster and of every RayJob that embeds one."""
    out = []
    for p, d in _manifests():
        if d["kind"] == "RayCluster":
            out.append((f"{p.name}:{d['metadata']['name']}", d["spec"]))
        elif d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
            out.append((f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]))
    return out


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return pods


def _cpu(quantity: Any) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


# --- commands found in the files ----------------------------------------------------------------------

def _command_lines(path: Path) -> list[str]:
    """Logical shell lines of a file (continuations joined): fenced code in Markdown, comments in YAML and
    the Dockerfile, the whole text of a shell script."""
    text = path.read_text()
    if path.suffix == ".md":
        raw, lang = [], None  # lang: None outside a fence, else the fence's info string
        for line in text.splitlines():
            if line.lstrip().startswith("```"):
                lang = line.strip()[3:].strip() if lang is None else None
            elif lang in ("bash", "sh", "shell", ""):
                raw.append(line)
    elif path.suffix == ".yaml" or path.name == "Dockerfile":
        raw = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines() if line.lstrip().startswith("#")]
    else:
        raw = text.splitlines()
    lines, cur = [], ""
    for line in raw:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            lines.append(cur + line)
            cur = ""
    return lines + ([cur] if cur else [])


_SEPARATORS = {";", "&&", "||", "|", ")", "&"}


def overlay_leaves(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """An overlay's leaves by dotted key."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(overlay_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return []


def _until_separator(tokens: list[str]) -> list[str]:
    out = []
    for t in tokens:
        if t in _SEPARATORS:
            break
        out.append(t)
    return out


def _job_commands() -> list[tuple[str, str, list[str]]]:
    """(where, job, args) of every ``python -m jobs.X ...`` and ``cluster/local.sh ... X ...`` command in the
    files, plus the RayJob entrypoints; args as the job receives them."""
    found: list[tuple[str, str, list[str]]] = []
    for p, d in _manifests():
        if d["kind"] == "RayJob":
            toks = shlex.split(d["spec"]["entrypoint"])
            assert toks[:2] == ["python", "-m"] and toks[2].startswith("jobs."), (p.name, toks)
            found.append((f"{p.name} entrypoint", toks[2].split(".", 1)[1], toks[3:]))
    for path in _text_files():
        if not path.exists():
            continue
        for line in _command_lines(path):
            toks = _tokens(line)
            for i, t in enumerate(toks):
                if t == "python" and toks[i + 1:i + 2] == ["-m"] and toks[i + 2:i + 3] \
                        and re.fullmatch(r"jobs\.[a-z_]+", toks[i + 2]):
                    found.append((f"{path.name}: {line.strip()[:80]}", toks[i + 2].split(".", 1)[1],
                                  _until_separator(toks[i + 3:])))
                if t.endswith("cluster/local.sh") and (path != LOCAL_SH or i == 0):
                    rest = _until_separator(toks[i + 1:])
                    opts: list[str] = []
                    while rest and rest[0].startswith("-"):
                        if rest[0] in ("--num-cpus", "--num-gpus", "--overlay"):
                            opts += rest[:2]
                            rest = rest[2:]
                        else:
                            opts.append(rest.pop(0))
                    if not rest or "--help" in opts or "-h" in opts or not re.fullmatch(r"[a-z_]+", rest[0]):
                        continue
                    overlay = ["--overlay", opts[opts.index("--overlay") + 1]] if "--overlay" in opts else []
                    found.append((f"{path.name}: {line.strip()[:80]}", rest[0],
                                  ["--config", "ray_config.yaml", *overlay, *rest[1:]]))
    return found


def _parse_job(job: str, args: list[str], where: str = ""):
    """Parse a job's arguments exactly as ``jobs._common.job_main`` (``mer.cli.main``) does and resolve its
    config."""
    try:
        ns = build_parser().parse_args([job.replace("_", "-"), *args])
    except SystemExit as e:  # argparse: unknown flag, missing required flag
        raise AssertionError(f"{where}: jobs.{job} {' '.join(args)}: arguments do not parse") from e
    try:
        return ns, resolve_config(ns)
    except ConfigError as e:
        raise AssertionError(f"{where}: jobs.{job} {' '.join(args)}: {e}") from None


# --- YAML ---------------------------------------------------------------------------------------------

def test_cluster_yamls_are_there_and_parse() -> None:
    names = {str(p.relative_to(CLUSTER)) for p in _yamls()}
    assert EXPECTED_YAMLS <= names, EXPECTED_YAMLS - names
    for p in _yamls():
        docs = _docs(p)  # multi-document files are fine
        assert docs, f"{p}: empty"
        assert all(isinstance(d, dict) for d in docs), f"{p}: every document must be a mapping"


def test_gpu_overlay_validates_through_the_jobs_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--config ray_config.yaml --overlay cluster/ray_config.gpu.yaml`` as a job parses it; every leaf lands."""
    monkeypatch.chdir(ROOT)
    _, cfg = _parse_job("extract", ["--config", "ray_config.yaml", "--overlay", "cluster/ray_config.gpu.yaml",
                                    "--manifest", "s3://b/m.parquet", "--out", "s3://b/f"])
    dumped = cfg.model_dump(mode="json")
    leaves = overlay_leaves(yaml.safe_load(OVERLAY.read_text()))
    assert len(leaves) > 20
    for key, value in leaves.items():
        node: Any = dumped
        for part in key.split("."):
            node = node[part]
        assert node == value, f"{key}: overlay says {value}, resolved config has {node!r}"
    # The same file through mer.config directly, and as --set flags.
    assert load_config(ROOT / "ray_config.yaml", overlays=[OVERLAY]).hash() == cfg.hash()
    sets = [f"{k}={json.dumps(v)}" for k, v in leaves.items()]
    assert load_config(ROOT / "ray_config.yaml", overrides=sets).hash() == cfg.hash()


def test_gpu_overlay_fits_one_gpu_node() -> None:
    """The overlay's per-node plan fits the GPU node it says it is sized for, in aws-gpu.yaml and in KubeRay;
    docs/cluster.md quotes the same totals."""
    cfg = load_config(ROOT / "ray_config.yaml", overlays=[OVERLAY])
    ex, en = cfg.extract, cfg.enrich
    stages = [ex.decode.resources, ex.face.resources, *(getattr(ex.encoders, b).resources
                                                        for b in ("global_visual", "face", "audio", "text"))]
    engines = en.resources.concurrency * en.tensor_parallel_size
    gpus = sum(r.concurrency * r.num_gpus for r in stages) + engines * en.resources.num_gpus
    cpus = sum(r.concurrency * r.num_cpus for r in stages) + engines * en.resources.num_cpus  # vLLM bundles
    aws = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())["available_node_types"]["gpu_h100"]["resources"]
    rc = next(d for _, d in _manifests() if d["kind"] == "RayCluster")
    group = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-h100")
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    for where, cap_cpu, cap_gpu in [("aws-gpu.yaml gpu_h100", aws["CPU"], aws["GPU"]),
                                    ("raycluster.yaml gpu-h100", _cpu(limits["cpu"]), int(limits["nvidia.com/gpu"]))]:
        assert gpus <= cap_gpu, f"{where}: overlay asks {gpus} GPUs > {cap_gpu}"
        assert cpus <= cap_cpu, f"{where}: overlay asks {cpus} CPUs > {cap_cpu}"
        tr = cfg.train.resources
        assert tr.concurrency * tr.num_gpus <= cap_gpu and tr.concurrency * tr.num_cpus <= cap_cpu
        assert cfg.score.resources.concurrency * cfg.score.resources.num_gpus <= cap_gpu
    # The self-contained training RayJob holds the overlay's train workers.
    train_job = next(d for _, d in _manifests() if d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"])
    wl = train_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    wl = wl["resources"]["limits"]
    tr = cfg.train.resources
    assert tr.concurrency * tr.num_gpus <= int(wl["nvidia.com/gpu"])
    assert tr.concurrency * tr.num_cpus <= _cpu(wl["cpu"])
    quoted = f"{gpus:g} of 8 GPUs, {cpus:g} of {_cpu(limits['cpu']):g} CPUs"
    assert quoted in DOCS.read_text(), f"docs/cluster.md should quote the overlay's totals: {quoted}"


# --- commands, flags, config keys ---------------------------------------------------------------------

def test_named_jobs_exist_with_main() -> None:
    named: dict[str, list[str]] = {}
    for path in _text_files():
        if path.exists():
            for job in re.findall(r"python -m jobs\.([a-z_]+)\b", path.read_text()):
                named.setdefault(job, []).append(path.name)
    for _, d in _manifests():
        if d["kind"] == "RayJob":
            named.setdefault(re.search(r"python -m jobs\.([a-z_]+)", d["spec"]["entrypoint"]).group(1), [])
    assert {"extract", "train", "score"} <= set(named), named
    for job, where in named.items():
        assert (ROOT / "jobs" / f"{job}.py").is_file(), f"jobs.{job} (named in {where}) has no jobs/{job}.py"
        assert callable(getattr(importlib.import_module(f"jobs.{job}"), "main", None)), f"jobs/{job}.py: no main"


def test_job_commands_parse_with_the_jobs_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every job command line in the files is accepted by the job's parser and its config resolves."""
    monkeypatch.chdir(ROOT)
    commands = _job_commands()
    where = {w.split(":")[0].split(" ")[0] for w, _, _ in commands}
    assert {"cluster.md", "rayjob-extract.yaml", "rayjob-train.yaml", "aws-gpu.yaml", "local.sh"} <= where, where
    for w, job, args in commands:
        _parse_job(job, args, w)  # raises with the command named


def test_n_node_examples_scale_every_concurrency_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that overrides overlay concurrencies multiplies each by the same node count N."""
    monkeypatch.chdir(ROOT)
    per_node = {k: v for k, v in overlay_leaves(yaml.safe_load(OVERLAY.read_text())).items()
                if k.endswith("concurrency")}
    checked = 0
    for w, job, args in _job_commands():
        if "cluster/ray_config.gpu.yaml" not in args:
            continue
        sets = dict(a.split("=", 1) for a in args[args.index("cluster/ray_config.gpu.yaml") + 1:]
                    if "=" in a and a.split("=", 1)[0] in per_node)
        if not sets:
            continue
        ratios = {int(v) / int(per_node[k]) for k, v in sets.items()}
        assert len(ratios) == 1 and ratios.pop().is_integer(), f"{w}: {sets} vs per node {per_node}"
        checked += 1
    assert checked, "docs/cluster.md shows no N-node example"


def test_set_overrides_and_config_keys_exist() -> None:
    """Every `--set key=value` in the files validates, and every dotted config key they name exists."""
    known = load_config().model_dump(mode="json")
    sets, keys = [], []
    for path in _text_files():
        if not path.exists():
            continue
        text = path.read_text()
        sets += [(path.name, f"{m.group(1)}={m.group(2).strip(QUOTES)}") for m in
                 re.finditer(r"--set[= ]+['\"]?([A-Za-z_][\w.]*)=(\"[^\"]*\"|'[^']*'|[^\s'\"`]*)", text)
                 if f"{m.group(1)}={m.group(2)}".lower() not in PLACEHOLDERS]
        keys += [(path.name, m.group(0)) for m in
                 re.finditer(rf"(?<![\w./$-])(?:{'|'.join(SECTIONS)})(?:\.[a-z0-9_]+)+(?![\w/(-])", text)]
    assert len(sets) >= 10 and len(keys) >= 10, (sets, keys)
    for where, item in sets:
        try:
            load_config(overrides=[item])
        except ConfigError as e:
            raise AssertionError(f"{where}: --set {item}: {e}") from None
    for where, key in keys:
        if key in INVALID_EXAMPLES:
            continue
        node: Any = known
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{where}: {key} is not a config key"
            node = node[part]


# --- versions and pins --------------------------------------------------------------------------------

def test_ray_version_agrees_everywhere() -> None:
    import ray

    v = ray.__version__
    assert re.search(rf'"ray\[[^\]]*\]=={re.escape(v)}"', _pyproject()), f"pyproject does not pin ray=={v}"
    base = re.search(r"^FROM (\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert base.startswith(f"rayproject/ray:{v}-"), base
    assert yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())["docker"]["image"] == base
    specs = _cluster_specs()
    assert len(specs) >= 2
    images = set()
    for where, spec in specs:
        assert str(spec["rayVersion"]) == v, f"{where}: rayVersion {spec['rayVersion']} != {v}"
        for _, pod in _pod_templates(spec):
            images |= {c["image"] for c in pod["containers"]}
    assert len(images) == 1, f"KubeRay pods run different images: {images}"
    image = images.pop()
    assert image.endswith(f"-ray{v}"), f"{image}: tag must carry ray {v}"
    built = {m.strip(QUOTES).replace("$REGISTRY", "registry.example.com") for p in (DOCKERFILE, DOCS)
             for m in re.findall(r"docker build -f cluster/Dockerfile -t (\S+)", p.read_text())}
    assert built == {image}, f"docker build tags {built} != manifest image {image}"


def test_install_pins_match_pyproject() -> None:
    ds = re.search(r'"deepspeed==([\d.]+)"', _pyproject()).group(1)
    torch = re.search(r'"(torch[^"]*)"', _pyproject()).group(1)
    for path in (DOCKERFILE, CLUSTER / "aws-gpu.yaml"):
        text = path.read_text()
        pins = set(re.findall(r"deepspeed==([\d.]+)", text))
        assert pins == {ds}, f"{path}: DeepSpeed pin {pins} differs from pyproject's {ds}"
        assert f'"{torch}"' in text, f"{path}: torch range differs from pyproject's {torch}"
        assert "--no-build-isolation deepspeed" in text, f"{path}: DeepSpeed's build imports torch"


# --- KubeRay manifests --------------------------------------------------------------------------------

def test_kuberay_manifests_have_the_required_fields() -> None:
    kinds = [d["kind"] for _, d in _manifests()]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") >= 2, kinds
    workdir = re.findall(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M)[-1]
    cluster_name = next(d["metadata"]["name"] for _, d in _manifests() if d["kind"] == "RayCluster")
    for p, d in _manifests():
        assert d["apiVersion"] == "ray.io/v1", p
        assert d["metadata"].get("name"), p
        if d["kind"] == "RayCluster":
            assert d["spec"]["enableInTreeAutoscaling"] is True, f"{p}: the Ray autoscaler must be on"
            assert any(g["maxReplicas"] > g["minReplicas"] for g in d["spec"]["workerGroupSpecs"]), "no autoscaling"
        if d["kind"] == "RayJob":
            spec = d["spec"]
            assert spec["entrypoint"].startswith("python -m jobs."), p
            assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), f"{p}: exactly one of the two"
            if "clusterSelector" in spec:
                assert spec["clusterSelector"] == {"ray.io/cluster": cluster_name}, f"{p}: not {cluster_name}"
                assert not spec.get("backoffLimit"), f"{p}: KubeRay rejects backoffLimit with clusterSelector"
            else:
                assert spec["shutdownAfterJobFinishes"] is True, p
            if spec.get("ttlSecondsAfterFinished"):
                assert spec.get("shutdownAfterJobFinishes") is True, f"{p}: TTL needs shutdownAfterJobFinishes"
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
            assert runtime_env["working_dir"] == workdir, f"{p}: working_dir must be the image's repo copy"
    for where, spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: head must take no tasks"
        assert head["template"]["spec"]["containers"][0]["name"] == "ray-head", where
        groups = spec["workerGroupSpecs"]
        assert groups and len({g["groupName"] for g in groups}) == len(groups), where
        gpu_groups = 0
        for g in groups:
            replicas = g.get("replicas", g["minReplicas"])
            assert 0 <= g["minReplicas"] <= replicas <= g["maxReplicas"], (where, g["groupName"])
            c = g["template"]["spec"]["containers"][0]
            assert c["name"] == "ray-worker", (where, g["groupName"])
            res = c["resources"]
            if "nvidia.com/gpu" in res.get("limits", {}):
                gpu_groups += 1
                assert int(res["limits"]["nvidia.com/gpu"]) >= 1
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], (where, g["groupName"])
        assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
        for name, pod in _pod_templates(spec):
            ray_container = pod["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{where} {name}: no /dev/shm for the object store"
            vol = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
            medium = (vol.get("emptyDir") or {}).get("medium")
            assert medium == "Memory", f"{where} {name}: /dev/shm must be a memory-backed emptyDir"


def test_credentials_come_only_from_secrets() -> None:
    secret_names = set()
    for where, spec in _cluster_specs():
        env_sets = []
        for name, pod in _pod_templates(spec):
            env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
            env_sets.append((name, set(env)))
            for var, e in env.items():
                if SECRET_KEY.search(var) or var == "AWS_ENDPOINT_URL":
                    assert "value" not in e, f"{where} {name}: {var} has a literal value"
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["key"] == var
                    secret_names.add(ref["name"])
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(env), (where, name)
            endpoint = env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
            assert endpoint.get("optional") is True, f"{where} {name}: AWS_ENDPOINT_URL must stay optional"
        assert len({frozenset(s) for _, s in env_sets}) == 1, f"{where}: pods get different variables {env_sets}"
    assert len(secret_names) == 1, secret_names
    secret = secret_names.pop()
    assert f"kubectl create secret generic {secret}" in DOCS.read_text()
    for p, d in _manifests():
        if d["kind"] == "RayJob":
            env_vars = (yaml.safe_load(d["spec"]["runtimeEnvYAML"]) or {}).get("env_vars") or {}
            leaked = [k for k in env_vars if SECRET_KEY.search(k)]
            assert not leaked, f"{p}: credentials in runtimeEnvYAML (shown in the dashboard): {leaked}"
    literal = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
                         r"|(?i:aws_secret_access_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}")
    for path in [*CLUSTER.rglob("*"), DOCS]:
        if path.is_file():
            assert not literal.search(path.read_text()), f"{path}: looks like a literal AWS credential"


# --- Ray token authentication ---------------------------------------------------------------------------

def test_every_recipe_shares_one_ray_auth_token() -> None:
    """Ray >= 2.52 refuses a node or client without the cluster's token (InvalidAuthToken) once a head runs
    with token auth, which Ray 2.60 switches on by itself for `ray start --head` when ~/.ray/auth_token
    exists: every recipe sets the mode explicitly and hands the same token to every node and submitter."""
    aws = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    env = dict(o.split(None, 1)[1].split("=", 1) for o in aws["docker"]["run_options"] if o.startswith("--env "))
    assert env.get("RAY_AUTH_MODE") == "token", "aws-gpu.yaml: containers must run with RAY_AUTH_MODE=token"
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    assert token_path in aws["file_mounts"], "aws-gpu.yaml: RAY_AUTH_TOKEN_PATH must be a synced file mount"
    assert aws["file_mounts"][token_path] == "~/.ray/auth_token", "the token `ray job submit` uses locally"
    assert "ray get-auth-token --generate" in (CLUSTER / "aws-gpu.yaml").read_text()
    for where, spec in _cluster_specs():
        assert spec.get("authOptions") == {"mode": "token"}, f"{where}: no KubeRay token authentication"
    for needle in ("RAY_AUTH_MODE=token", "ray get-auth-token --generate", "RAY_AUTH_MODE=disabled",
                   "kubectl get secret mer -o jsonpath='{.data.auth_token}'"):
        assert needle in DOCS.read_text(), f"docs/cluster.md lacks {needle!r}"


# --- docs ---------------------------------------------------------------------------------------------

def test_docs_cover_every_path_and_name_existing_files() -> None:
    text = DOCS.read_text()
    for needle in ("ray start --head", "ray job submit --address http://127.0.0.1:8265", "ray stop",
                   "ray up -y cluster/aws-gpu.yaml", "ray down -y cluster/aws-gpu.yaml",
                   "docker build -f cluster/Dockerfile", "kubectl apply -f cluster/kuberay/rayjob-extract.yaml",
                   "cluster/kuberay/raycluster.yaml | kubectl apply -f -", "--overlay cluster/ray_config.gpu.yaml",
                   "AWS_ENDPOINT_URL", "secretKeyRef", "mer bench extract"):
        assert needle in text, f"docs/cluster.md lacks {needle!r}"
    for ref in set(re.findall(r"(?<![\w/])((?:cluster|docs|jobs|mer|tests)/[\w./-]*\w)", text)):
        assert (ROOT / ref).exists(), f"docs/cluster.md names {ref}, which does not exist"


# --- cluster/local.sh ---------------------------------------------------------------------------------

STUB = """#!/bin/bash
echo "$*" >> "$RAY_STUB_LOG"
echo "${RAY_AUTH_MODE:-unset} $*" >> "$RAY_STUB_LOG.auth"
case "$1 $2" in
  "status "*) exit "${RAY_STUB_STATUS_RC:-1}" ;;
  "job submit") exit "${RAY_STUB_SUBMIT_RC:-0}" ;;
  "get-auth-token --generate") mkdir -p "$HOME/.ray" && printf stub-token-value > "$HOME/.ray/auth_token" \
                                 && printf stub-token-value ;;
esac
exit 0
"""


@pytest.fixture
def stub_ray(tmp_path: Path) -> dict[str, str]:
    """A PATH whose `ray` records its arguments instead of starting or stopping anything."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "ray"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    path = f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    assert shutil.which("ray", path=path) == str(stub)  # never the real one: `ray stop` would stop real clusters
    return {"PATH": path, "RAY_STUB_LOG": str(tmp_path / "calls.log"), "HOME": str(tmp_path)}


def _local(env: dict[str, str], *args: str, **extra: str) -> tuple[int, str, list[str]]:
    proc = subprocess.run(["bash", str(LOCAL_SH), *args], env={**env, **extra}, capture_output=True, text=True,
                          timeout=60, cwd="/")
    log = Path(env["RAY_STUB_LOG"])
    return proc.returncode, proc.stdout + proc.stderr, log.read_text().splitlines() if log.exists() else []


def test_local_sh_syntax_and_usage(stub_ray: dict[str, str]) -> None:
    assert subprocess.run(["bash", "-n", str(LOCAL_SH)]).returncode == 0
    assert LOCAL_SH.stat().st_mode & stat.S_IXUSR, "cluster/local.sh must be executable"
    assert "set -euo pipefail" in LOCAL_SH.read_text().splitlines()[:10]
    rc, out, calls = _local(stub_ray, "--help")
    assert rc == 0 and out.startswith("usage: cluster/local.sh") and not calls
    rc, out, calls = _local(stub_ray, "no_such_job")
    assert rc == 2 and "unknown job" in out and not calls
    rc, out, calls = _local(stub_ray)
    assert rc == 2 and "usage" in out and not calls


def test_local_sh_starts_submits_stops(stub_ray: dict[str, str]) -> None:
    rc, out, calls = _local(stub_ray, "--num-cpus", "3", "--overlay", "cluster/ray_config.gpu.yaml", "extract",
                            "--manifest", "s3://b/m.parquet", "--out", "s3://b/f")
    assert rc == 0, out
    assert [c for c in calls if c.startswith(("status", "start"))][0].startswith("status"), calls
    start = next(c for c in calls if c.startswith("start "))
    assert "--head" in start and "--num-cpus 3" in start and "--dashboard-host 127.0.0.1" in start
    submit = next(c for c in calls if c.startswith("job submit"))
    assert calls.index(start) < calls.index(submit) and calls[-1] == "stop", calls
    assert "--address http://127.0.0.1:8265 --working-dir ." in submit
    job = submit.split(" -- ", 1)[1]
    assert job == ("python -m jobs.extract --config ray_config.yaml --overlay cluster/ray_config.gpu.yaml "
                   "--manifest s3://b/m.parquet --out s3://b/f")
    # The job's exit status is the script's, and Ray is stopped anyway.
    Path(stub_ray["RAY_STUB_LOG"]).unlink()
    rc, _, calls = _local(stub_ray, "train", "--features", "f", "--out", "o", RAY_STUB_SUBMIT_RC="1")
    assert rc == 1 and calls[-1] == "stop", calls
    # --keep leaves Ray running.
    Path(stub_ray["RAY_STUB_LOG"]).unlink()
    rc, _, calls = _local(stub_ray, "--keep", "score", "--run", "r", "--features", "f", "--out", "o")
    assert rc == 0 and "stop" not in calls, calls


def test_local_sh_shares_one_auth_mode_and_token_with_every_ray_call(stub_ray: dict[str, str]) -> None:
    """Ray 2.60's `ray start --head` turns token auth on by itself when ~/.ray/auth_token exists, while
    joining nodes and `ray job` clients only send the token with RAY_AUTH_MODE=token: every call must say it."""
    auth_log = Path(stub_ray["RAY_STUB_LOG"] + ".auth")
    job = ("extract", "--manifest", "m", "--out", "o")
    rc, out, calls = _local(stub_ray, *job)
    assert rc == 0, out
    assert calls[0] == "get-auth-token --generate", calls  # no token yet: one is made before Ray starts
    assert (Path(stub_ray["HOME"]) / ".ray" / "auth_token").is_file()
    assert "stub-token-value" not in out, "the token must never be printed"
    modes = auth_log.read_text().splitlines()
    assert len(modes) == len(calls) and all(m.startswith("token ") for m in modes), modes
    # The token exists now: reused, not regenerated; --keep says how another node joins.
    for f in (Path(stub_ray["RAY_STUB_LOG"]), auth_log):
        f.unlink()
    rc, out, calls = _local(stub_ray, "--keep", *job)
    assert rc == 0 and not any(c.startswith("get-auth-token") for c in calls), calls
    assert "RAY_AUTH_MODE=token ray start --address 127.0.0.1:6379" in out
    # An explicit RAY_AUTH_MODE (here: opting out) is respected everywhere.
    (Path(stub_ray["HOME"]) / ".ray" / "auth_token").unlink()
    for f in (Path(stub_ray["RAY_STUB_LOG"]), auth_log):
        f.unlink()
    rc, out, calls = _local(stub_ray, *job, RAY_AUTH_MODE="disabled")
    assert rc == 0 and not any(c.startswith("get-auth-token") for c in calls), calls
    assert all(m.startswith("disabled ") for m in auth_log.read_text().splitlines())


def test_local_sh_refuses_a_running_cluster(stub_ray: dict[str, str]) -> None:
    rc, out, calls = _local(stub_ray, "extract", "--manifest", "m", "--out", "o", RAY_STUB_STATUS_RC="0")
    assert rc == 1 and "already runs" in out
    assert not any(c.startswith(("start", "stop", "job")) for c in calls), calls


# --- jobs run what `mer` runs ---------------------------------------------------------------------------

def _logged_config(caplog: pytest.LogCaptureFixture) -> tuple[str, dict]:
    """(hash, mapping) of the one 'resolved config' a job logged."""
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resolved config")]
    assert len(logged) == 1, logged
    head, body = logged[0].split("\n", 1)
    return head.split("hash ", 1)[1].rstrip("):"), yaml.safe_load(body)


@pytest.mark.parametrize("job", ["train", "demo"])
def test_a_job_logs_the_config_it_runs_with(job: str, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """`python -m jobs.<name>` runs `mer <name>` itself: the config it logs (redacted) is the one its handler
    gets, including the demo's own overrides below the user's overlay and --set flags."""
    import mer.cli

    used: list = []
    monkeypatch.setattr(mer.cli, "init_ray", lambda cfg, **kw: cfg)  # joined cluster: the config as it is
    monkeypatch.setattr(mer.cli, "train_run", lambda cfg, *a, **kw: used.append(cfg) or {})
    monkeypatch.setattr(mer.cli, "run_demo", lambda cfg, *a, **kw: used.append(cfg) or {})
    overlay = tmp_path / "o.yaml"
    overlay.write_text("train: {max_epochs: 7}\nstorage: {s3_endpoint_url: 'http://u:pw@127.0.0.1:9'}\n")
    args = {"train": ["--features", "f", "--out", str(tmp_path / "r")], "demo": ["--workdir", str(tmp_path / "d")]}[job]
    mod = importlib.import_module(f"jobs.{job}")
    with caplog.at_level("INFO"):
        assert mod.main(["--config", str(ROOT / "ray_config.yaml"), "--overlay", str(overlay),
                         "--set", "train.lr=0.02", *args]) == 0
    assert len(used) == 1
    cfg = used[0]
    digest, logged = _logged_config(caplog)
    assert digest == cfg.hash()
    expected = cfg.model_dump(mode="json")
    assert expected["storage"]["s3_endpoint_url"] == "http://u:pw@127.0.0.1:9"
    expected["storage"]["s3_endpoint_url"] = "http://u:***@127.0.0.1:9"  # the log is redacted, nothing else
    assert logged == expected
    assert (cfg.train.max_epochs, cfg.train.lr) == (7, 0.02)
    if job == "demo":
        from mer.demo import DEMO_OVERRIDES

        assert cfg.profile == "tiny" and cfg.enrich.enabled and cfg.extract.decode.num_frames == 8
        assert cfg.train.resources.concurrency == 1 and "train.max_epochs=20" in DEMO_OVERRIDES  # overlay won
