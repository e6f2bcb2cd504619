"""Contract tests on the code itself: imports follow the data, one owner per piece of knowledge
(the config schema's enums and the workflow's wildcard constraints are the package's constants),
every job rule declares what it needs and passes what its step requires, and the repository
stands alone."""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from e2epath.__main__ import STEPS
from e2epath.core import layout, predictions, vocabulary
from e2epath.models import aggregators, presets
from e2epath.models.weights import ARCHITECTURES
from e2epath.preprocess.tissue import PRESETS
from e2epath.train.loop import OPTIMIZER_CLASSES
from helpers import GPU_RULES, PACKAGE_DIR, ROOT, imported_names, module_path, parsed_workflows

SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"

# The stages, each a folder of the package, in the order data flows through them; a module may
# import its own stage and earlier ones, never a later one. Every module's stage is its folder: the
# package root holds only `__init__` and `__main__` (the command line, which names steps by string).
STAGES = ("core", "sources", "slide", "preprocess", "data", "models", "features", "train", "evaluate", "figures",
          "deploy", "config")
ROOT_MODULES = {"e2epath", "e2epath.__main__"}


def stage_of(module: str) -> str:
    """The stage of a module: the folder it lives in (the root modules: the first stage)."""
    if module in ROOT_MODULES:
        return STAGES[0]
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in STAGES:
        raise KeyError(f"module {module} is not in a stage folder ({', '.join(STAGES)}); move it into one")
    return parts[1]


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def backward_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """'importer (stage) -> imported (stage)' for every import of a later stage by an earlier one."""
    found = []
    for module, path in package_modules(package_dir).items():
        for name in imported_names(path, module):
            if not name.startswith("e2epath"):
                continue
            parts = name.split(".")
            target = next(".".join(parts[:k]) for k in range(len(parts), 0, -1)
                          if module_path(".".join(parts[:k]), package_dir) is not None)
            if STAGES.index(stage_of(target)) > STAGES.index(stage_of(module)):
                found.append(f"{module} ({stage_of(module)}) -> {target} ({stage_of(target)})")
    return sorted(set(found))


def test_imports_follow_the_data():
    assert backward_imports() == []


def test_every_module_has_a_stage():
    for module in package_modules():
        stage_of(module)
    with pytest.raises(KeyError, match="not in a stage folder"):
        stage_of("e2epath.helpers")  # a flat module at the package root


def stage_table(package_dir: Path = PACKAGE_DIR) -> str:
    """The stage table of docs/architecture.md, made from the package's folders."""
    rows = ["| stage | modules |", "|---|---|"]
    modules = package_modules(package_dir)
    for stage in STAGES:
        names = sorted(m.split(".", 2)[2] for m in modules if m.count(".") >= 2 and stage_of(m) == stage)
        rows.append(f"| `{stage}/` | " + ", ".join(f"`{n}`" for n in names) + " |")
    return "\n".join(rows)


def test_the_architecture_doc_shows_the_stages_as_they_are():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    shown = doc.split("<!-- stages")[1].split("-->", 1)[1].split("<!-- /stages -->")[0].strip()
    assert shown == stage_table(), "docs/architecture.md's stage table is stale; replace it with:\n" + stage_table()
    assert {p.name for p in PACKAGE_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(STAGES)


def test_parsing_the_workflow_imports_no_torch():
    """The Snakefile resolves the config at every invocation (and, on SLURM, in every job): what it
    imports stays light — torch alone costs seconds."""
    code = ("import sys; import e2epath.config.resolve, e2epath.core.devices, e2epath.train.recipe; "
            "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'cv2', 'openslide') if m in sys.modules); "
            "sys.exit(', '.join(heavy) or None)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "workflow", capture_output=True, text=True)
    assert res.returncode == 0, f"parsing the workflow imports {res.stderr.strip()}"


def test_the_import_check_finds_a_backward_import(tmp_path):
    pkg = tmp_path / "e2epath"
    for sub in ("core", "preprocess", "train", "figures"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "preprocess" / "patching.py").write_text("def f():\n    from ..train import loop\n")
    (pkg / "train" / "loop.py").write_text("from ..core import io\n")
    (pkg / "core" / "io.py").write_text("")
    (pkg / "figures" / "roc.py").write_text("from e2epath.train.loop import x\n")  # later imports earlier: fine
    assert backward_imports(pkg) == ["e2epath.preprocess.patching (preprocess) -> e2epath.train (train)",
                                     "e2epath.preprocess.patching (preprocess) -> e2epath.train.loop (train)"]


# ------------------------------------------------------------------ one owner per name


def schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def test_schema_enums_are_the_package_constants():
    s = schema()
    defs, props = s["definitions"], s["properties"]
    method = defs["method_spec"]["properties"]
    assert defs["id"]["pattern"] == f"^{vocabulary.ID_PATTERN}$"
    assert tuple(defs["magnification"]["enum"]) == vocabulary.MAGNIFICATIONS
    assert method["encoder"]["$ref"] == "#/definitions/id"  # a preset or the config's own: e2epath.presets
    assert props["twostage"]["properties"]["encoders"]["items"]["$ref"] == "#/definitions/id"
    assert set(props["encoders"]["additionalProperties"]["properties"]) == set(presets.FIELDS)
    assert tuple(props["encoders"]["additionalProperties"]["properties"]["embedding"]["enum"]) == presets.EMBEDDINGS
    assert tuple(props["encoders"]["additionalProperties"]["properties"]["dtype"]["enum"]) == presets.DTYPES
    assert set(ARCHITECTURES) <= set(presets.PRESETS)
    assert tuple(method["aggregator"]["enum"]) == vocabulary.AGGREGATORS == tuple(aggregators.AGGREGATORS)
    assert props["cohorts"]["propertyNames"]["not"]["const"] == vocabulary.INTERNAL  # the training cohort's name
    assert tuple(method["optimizer"]["enum"]) == vocabulary.OPTIMIZERS == tuple(OPTIMIZER_CLASSES)
    assert tuple(method["eval_crop"]["enum"]) == vocabulary.EVAL_CROPS
    task = props["tasks"]["additionalProperties"]["properties"]
    assert tuple(task["type"]["enum"]) == vocabulary.TASK_TYPES
    assert tuple(task["bag"]["enum"]) == vocabulary.BAG_UNITS
    assert tuple(task["select_on"]["enum"]) == vocabulary.SELECT_ON
    assert set(vocabulary.SELECT_ON) == {"auc", "accuracy", "balanced_accuracy", "macro_f1", "qwk", "c_index"}
    assert tuple(props["splits"]["properties"]["mode"]["enum"]) == vocabulary.SPLIT_MODES
    assert tuple(props["preprocess"]["properties"]["tissue"]["properties"]["preset"]["enum"]) == tuple(PRESETS)
    assert tuple(props["preprocess"]["properties"]["magnifications"]["items"]["$ref"].split("/")[-1:]) == \
        ("magnification",)
    for family in vocabulary.FAMILIES:  # method names become folder names
        assert props[family]["properties"]["methods"]["propertyNames"]["pattern"] == f"^{vocabulary.ID_PATTERN}$"


def test_metric_names_are_what_the_metrics_compute():
    rng = np.random.default_rng(0)
    tables = {
        "classification": pd.DataFrame({"case_id": list("abcd"), "label": ["x", "y", "x", "y"],
                                        "prob_x": rng.uniform(size=4)}).assign(prob_y=lambda d: 1 - d["prob_x"]),
        "grading": pd.DataFrame({"case_id": list("abcd"), "label": ["1", "2", "3", "1"],
                                 "prob_1": 0.2, "prob_2": 0.3, "prob_3": 0.5}),
        "survival": pd.DataFrame({"case_id": list("abcd"), "time": [1, 2, 3, 4], "event": [1, 1, 0, 1],
                                  "risk": [4, 3, 2, 1]}),
    }
    assert set(tables) == set(vocabulary.TASK_TYPES) == set(vocabulary.METRICS) == set(vocabulary.MAIN_METRIC)
    for task_type, df in tables.items():
        assert tuple(predictions.task_metrics(task_type, df)) == vocabulary.METRICS[task_type]
        assert vocabulary.MAIN_METRIC[task_type] in vocabulary.METRICS[task_type]
        assert set(vocabulary.METRICS[task_type]) <= set(vocabulary.METRIC_LABELS)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the string constants of a module's code: no docstrings, no help texts."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            skip.add(id(node.body[0].value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            skip |= {id(n) for n in ast.walk(node.value)}
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in skip]


def is_results_path(text: str) -> bool:
    """A path into the results tree or to a file of a training run (messages that mention one
    in passing are not paths)."""
    files = [*layout.RUN_FILES.values(), layout.CHECKPOINT]
    return text.startswith("results/") or any(text == f or text.endswith("/" + f) for f in files)


def test_only_the_layout_knows_where_results_go():
    """No package module builds a path of the results tree or names a file of a run; the
    workflow's rules ask e2epath.layout too (their logs and benchmarks aside)."""
    assert is_results_path("results/e2e/{task}") and is_results_path("predictions.tsv")
    assert not is_results_path("check results/splits (each case ...)")
    found = []
    for module, path in package_modules().items():
        if module == "e2epath.core.layout":
            continue
        found += [f"{path.name}:{line}: {text!r}" for line, text in _string_constants(path) if is_results_path(text)]
    assert found == []
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        paths = re.findall(r'"(results/[^"]*)"', smk.read_text())
        assert all(p.startswith(("results/logs/", "results/benchmarks/")) for p in paths), (smk.name, paths)


# ------------------------------------------------------------------ the workflow's rules


@pytest.fixture(scope="module")
def workflows():
    with parsed_workflows() as found:
        yield found


# What each wildcard must match and must not, written out here (the workflow builds its constraints
# from the package's constants; this checks the result, not the construction).
WILDCARDS = {
    "slide": (["DEMO-S001", "TCGA-A1-A0SB-01Z-00-DX1.8F9C", "a_b"], ["a/b", "a b", "", "x;rm"]),
    "method": (["r18_abmilx", "heads.n_heads-4.attn_plus-true"], ["a/b", "m n"]),
    "mag": (["5", "10", "20", "40"], ["15", "5x", "80", ""]),
    "family": (["e2e", "twostage"], ["mil", "e2e2"]),
    "encoder": (["resnet18", "resnet50", "uni", "uni2", "virchow2", "hoptimus0", "hoptimus1", "gigapath", "phikon2",
                 "ctranspath", "chief"], ["resnet", "uni3", "../x"]),
    "cohort": (["external"], ["internal", "other"]),  # the demo config's one external cohort
}


def test_wildcard_constraints_match_what_they_should_and_nothing_else(workflows):
    for wf in workflows.values():
        for name, (good, bad) in WILDCARDS.items():
            pattern = re.compile(f"(?:{wf.wildcard_constraints[name]})")
            assert all(pattern.fullmatch(v) for v in good), (name, [v for v in good if not pattern.fullmatch(v)])
            assert not any(pattern.fullmatch(v) for v in bad), (name, [v for v in bad if pattern.fullmatch(v)])


def job_rules(wf):
    return [r for r in wf.rules if r.script]


def test_every_job_rule_has_a_log_a_benchmark_an_env_and_resources(workflows):
    names = set()
    for wf in workflows.values():
        for rule in job_rules(wf):
            names.add(rule.name)
            assert rule.log and rule.benchmark, rule.name
            assert rule.conda_env and (ROOT / "workflow" / "rules" / rule.conda_env).resolve().is_file(), rule.name
            assert {"mem_mb", "runtime"} <= set(rule.resources), rule.name
    assert {"slide_qc", "slide_qc_shard", "patch", "patch_shard", "train_e2e", "figures_task"} <= names


def test_target_rules_run_nothing(workflows):
    for wf in workflows.values():
        for rule in wf.rules:
            if not rule.script:
                assert rule.name in ("all", "preprocess", "predict") and not rule.output, rule.name


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def step_parser(step: str, monkeypatch) -> argparse.ArgumentParser:
    """The argument parser a step builds (captured when it parses)."""
    import importlib

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module, func = STEPS[step].split(":")
    with pytest.raises(_Captured) as got:
        getattr(importlib.import_module(module), func)([])
    monkeypatch.undo()
    return got.value.parser


# Flags a rule passes only sometimes (None is left out, or no weights file for random init):
# optional on purpose.
SOMETIMES = {"sheet_mpp", "reference", "allow_upsample", "pretrained", "external", "weights"}


def test_what_a_rule_always_passes_its_step_requires(workflows, monkeypatch):
    """Defaults live in the config schema: a flag the rule always passes has no default in the
    step's parser, so the two cannot disagree."""
    checked = 0
    for wf in workflows.values():
        for rule in job_rules(wf):
            names = [n for n in (*rule.params._names, *rule.input._names, *rule.output._names)
                     if n not in ("step", "positional")]
            step = rule.params[rule.params._names["step"][0]]
            options = {a.dest: a for a in step_parser(step, monkeypatch)._actions}
            for name in names:
                assert name in options, f"rule {rule.name} passes --{name.replace('_', '-')}, unknown to {step}"
                if name not in SOMETIMES:
                    assert options[name].required, \
                        f"{step} --{name.replace('_', '-')} has a default; rule {rule.name} always passes it"
                    checked += 1
    assert checked > 60


def test_the_slurm_profile_gives_every_gpu_rule_a_gpu_and_groups_every_per_slide_rule():
    """Every rule that asks for a `gpu` on a GPU host gets one (and the GPU partition) from the SLURM
    profile, whose submit host has none; no other rule does; every per-slide and per-shard rule of
    every cohort is grouped."""
    profile = yaml.safe_load((ROOT / "profiles/slurm/profile.yaml").read_text())
    with parsed_workflows(gpus=1) as workflows:
        rules = {r.name: r for wf in workflows.values() for r in wf.rules}
        asking = {name for name, r in rules.items() if "gpu" in r.resources.keys() and r.resources["gpu"]}
        per_unit = {name for name, r in rules.items() if {"slide", "shard"} & set(r.wildcard_names)
                    and not name.endswith("extract_features_shard")}  # a shard's features: one GPU job
    assert asking == GPU_RULES
    given = {rule for rule, res in profile["set-resources"].items() if res.get("gpu")}
    assert given == asking, f"the SLURM profile misses {sorted(asking - given)} or has {sorted(given - asking)}"
    assert all("slurm_partition" in profile["set-resources"][r] for r in asking)
    assert per_unit and per_unit <= set(profile["groups"]), sorted(per_unit - set(profile["groups"]))
    assert set(profile["groups"]) <= set(rules)


def test_the_slurm_profile_leaves_memory_and_time_to_the_rules():
    profile = yaml.safe_load((ROOT / "profiles/slurm/profile.yaml").read_text())
    for rule, resources in profile["set-resources"].items():
        assert not {"mem_mb", "runtime"} & set(resources), rule
    assert not {"mem_mb", "runtime"} & set(profile.get("default-resources", {}))


# ------------------------------------------------------------------ a repository that stands alone


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    files = [ROOT / p for p in out if (ROOT / p).is_file()]
    return [p for p in files if p.suffix in (".py", ".md", ".smk", ".yaml", ".rst", ".toml", ".txt", ".sh", "")
            and p.name != "test_architecture.py"]


def test_nothing_points_outside_the_repository():
    found = []
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        for needle in ("../shared", "DESIGN.md", "CONTRACTS.md"):
            if needle in text:
                found.append(f"{path.relative_to(ROOT)}: {needle}")
    assert found == []


def test_markdown_links_point_to_files_that_exist():
    broken = []
    for path in tracked_text_files():
        if path.suffix != ".md":
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert broken == []
