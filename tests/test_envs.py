"""Each conda env in envs/ lists exactly the third-party packages its rules' code imports.

A rule runs `workflow/scripts/step.py` in its `conda:` env, which imports `e2epath.devices`,
`e2epath.__main__` and the module of its `step` (`e2epath.__main__.STEPS`). Their imports are
followed through the e2epath package (ast: relative imports, imports inside functions, parent
packages' `__init__`); imports guarded by `except ImportError` are optional and not required.
What the Snakefile itself imports at parse time (snakemake, jsonschema) runs in Snakemake's env.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2epath.__main__ import STEPS
from helpers import PACKAGE_DIR, ROOT, imported_names, module_path, parsed_workflows

STEP_SCRIPT = ROOT / "workflow" / "scripts" / "step.py"

# import name → conda-forge package name (identity when absent)
CONDA_NAMES = {
    "cv2": "opencv", "openslide": "openslide-python", "lmdb": "python-lmdb", "torch": "pytorch",
    "sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow", "matplotlib": "matplotlib-base",
    "skimage": "scikit-image",
}
# pip names, for a `- pip:` section (only for what conda-forge lacks)
PIP_NAMES = {"cv2": "opencv-python-headless", "openslide": "openslide-python", "lmdb": "lmdb", "torch": "torch",
             "sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow", "skimage": "scikit-image"}
# needed at run time without an import: tifffile's JPEG / LZW codecs (slidewriter) are imagecodecs
RUNTIME_EXTRAS = {"tifffile": {"imagecodecs"}}
ALWAYS_ALLOWED = {"python", "pip"}


@dataclass(frozen=True)
class Rule:
    name: str
    env: str | None   # env file name, e.g. "train.yaml"
    step: str | None
    script: str | None


def parse_rules(text: str) -> list[Rule]:
    """Rules of one .smk text with their conda env, `step` param and script."""
    rules = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)rule(?:\s+(\w+))?\s*:", line)  # `rule:` alone: the name is in `name:`
        if not m:
            continue
        indent, body = len(m[1]), []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        block = "\n".join(body)
        env = re.search(r"^\s*conda:\s*\n\s*[\"']([^\"']+)[\"']", block, re.M)
        step = re.search(r"^\s*step\s*=\s*[\"'](\w+)[\"']", block, re.M)
        script = re.search(r"^\s*script:\s*\n\s*[\"']([^\"']+)[\"']", block, re.M)
        name = m[2] or re.search(r"^\s*name:\s*\n\s*f?[\"']([^\"']+)[\"']", block, re.M)[1]
        rules.append(Rule(name, Path(env[1]).name if env else None, step[1] if step else None,
                          Path(script[1]).name if script else None))
    return rules


def third_party_imports(roots: list[tuple[Path, str | None]], package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Top-level third-party import names reachable from ``roots`` (file, module name) through
    the e2epath package."""
    todo, seen, found = list(roots), set(), set()
    while todo:
        path, module = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path, module):
            top = name.split(".")[0]
            if top == "e2epath":
                parts = name.split(".")
                for k in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b, a.b.c
                    sub = ".".join(parts[:k])
                    file = module_path(sub, package_dir)
                    if file is not None:
                        todo.append((file, sub))
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def env_packages(path: Path) -> tuple[set[str], set[str]]:
    """(conda package names, pip package names) listed by an env file, without versions."""
    spec = yaml.safe_load(path.read_text())
    conda, pip = set(), set()

    def bare(dep: str) -> str:
        return re.split(r"[\s=<>!~\[]", dep.split("::")[-1].strip(), maxsplit=1)[0].lower()

    for dep in spec.get("dependencies") or []:
        if isinstance(dep, dict):
            pip |= {bare(d) for d in dep.get("pip", [])}
        else:
            conda.add(bare(dep))
    return conda, pip


def rule_roots(rule: Rule, package_dir: Path = PACKAGE_DIR) -> list[tuple[Path, str | None]]:
    if rule.step not in STEPS:
        raise AssertionError(f"rule {rule.name}: step {rule.step!r} is not in e2epath.__main__.STEPS")
    module = STEPS[rule.step].split(":")[0]
    roots = [(module_path(module, package_dir), module)]
    if rule.script == "step.py":
        roots.append((STEP_SCRIPT, None))
    return roots


def check(rules: list[Rule], envs_dir: Path, package_dir: Path = PACKAGE_DIR) -> tuple[dict, dict]:
    """(missing, unused): env → {conda package: [rules needing it]}, env → {listed but unneeded}."""
    needed: dict[str, dict[str, list[str]]] = {}
    for rule in rules:
        if rule.env is None:
            continue
        wants = needed.setdefault(rule.env, {})
        for top in third_party_imports(rule_roots(rule, package_dir), package_dir):
            for pkg in {top} | RUNTIME_EXTRAS.get(top, set()):
                wants.setdefault(CONDA_NAMES.get(pkg, pkg).lower(), []).append(rule.name)
    missing, unused = {}, {}
    for env, wants in needed.items():
        conda, pip = env_packages(envs_dir / env)
        pip_wanted = {PIP_NAMES.get(t, t).lower() for t in wants}
        lacking = {pkg: sorted(set(who)) for pkg, who in wants.items() if pkg not in conda
                   and not ({pkg} | {PIP_NAMES.get(k, k) for k, v in CONDA_NAMES.items() if v == pkg}) & pip}
        if lacking:
            missing[env] = lacking
        extra = (conda - set(wants) - ALWAYS_ALLOWED) | (pip - pip_wanted)
        if extra:
            unused[env] = extra
    return missing, unused


def all_rules() -> list[Rule]:
    """Every rule of the workflow as Snakemake parses it (per-slide and sharded), `use rule` copies
    included."""
    rules = {}
    with parsed_workflows() as workflows:
        for wf in workflows.values():
            for r in wf.rules:
                step = r.params[r.params._names["step"][0]] if "step" in r.params._names else None
                env = Path(r.conda_env).name if r.conda_env else None
                rules[r.name] = Rule(r.name, env, step, Path(r.script).name if r.script else None)
    return list(rules.values())


def test_every_job_rule_has_a_conda_env_and_runs_a_known_step():
    rules = all_rules()
    jobs = [r for r in rules if r.script is not None]
    assert len(jobs) > 30 and {r.name for r in rules} - {r.name for r in jobs} == {"all", "preprocess", "predict"}
    for r in jobs:
        assert r.env is not None, f"rule {r.name} declares no conda env"
        assert (ROOT / "envs" / r.env).is_file(), f"rule {r.name}: env file envs/{r.env} missing"
        assert r.step in STEPS and r.script == "step.py", r


def test_each_env_lists_exactly_what_its_rules_import():
    rules = all_rules()
    missing, unused = check(rules, ROOT / "envs")
    assert not missing, f"packages imported by a rule's code but not in its env: {missing}"
    assert not unused, f"packages listed in an env that none of its rules imports: {unused}"
    envs = {r.env for r in rules if r.env}
    assert envs == {p.name for p in (ROOT / "envs").glob("*.yaml")}, "an env file no rule uses"


def test_imports_are_followed_through_the_package():
    """Spot checks on the real package: a relative import chain, an import inside a function,
    and an ImportError-guarded optional import."""
    features = third_party_imports([(module_path("e2epath.features.extraction"), "e2epath.features.extraction")])
    assert {"torch", "torchvision", "cv2", "lmdb", "numpy", "tqdm"} <= features  # torchvision via models
    devices = third_party_imports([(STEP_SCRIPT, None)])
    assert "torch" not in devices  # devices.torch_device imports torch only under `except ImportError`


def test_the_checker_finds_a_missing_and_an_unused_package(tmp_path):
    pkg = tmp_path / "e2epath"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "helper.py").write_text("def f():\n    import cv2\n    return cv2\n")
    (pkg / "sub" / "step.py").write_text(
        "from . import helper\nfrom ..io import x\ntry:\n    import torch\nexcept ImportError:\n    torch = None\n")
    (pkg / "io.py").write_text("import os\nimport yaml\n")
    (tmp_path / "fake.yaml").write_text("channels: [conda-forge]\ndependencies:\n  - python =3.11\n"
                                        "  - pyyaml >=6\n  - tqdm\n")
    smk = 'rule fake:\n    params:\n        step="fake"\n    conda:\n        "../../envs/fake.yaml"\n'
    rules = parse_rules(smk)
    assert rules == [Rule("fake", "fake.yaml", "fake", None)]
    STEPS["fake"] = "e2epath.sub.step:cli"
    try:
        missing, unused = check(rules, tmp_path, pkg)
    finally:
        del STEPS["fake"]
    assert missing == {"fake.yaml": {"opencv": ["fake"]}}  # cv2 inside a function, via `from . import`
    assert unused == {"fake.yaml": {"tqdm"}}                # pytorch is optional: neither missing nor listed
