"""Shard steps (preprocess.shards > 0) on real demo slides: the same per-slide outputs as the
per-slide steps, and a rerun redoes exactly the slides whose inputs changed."""
from __future__ import annotations

import logging
import os
import shutil
import zlib
from pathlib import Path

import pandas as pd
import pytest

from e2epath.core.io import read_json
from e2epath.preprocess import patching, qc, shards, store, tissue
from e2epath.sources import demo

MAG = 10


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> pd.DataFrame:
    d = tmp_path_factory.mktemp("shard-cohort")
    demo.write(d, n_slides=3, seed=0, scale=0.5)
    sheet = pd.read_csv(d / "slides.tsv", sep="\t", dtype={"slide_id": str, "case_id": str})
    sheet["path"] = [str(d / p) for p in sheet["path"]]
    return sheet


def shard_argv(sheet: pd.DataFrame, out: Path) -> dict[str, list[str]]:
    mpps = ["nan" if m != m else str(m) for m in sheet["mpp"]]
    patch_params = ["--magnification", str(MAG), "--patch-size", "128", "--min-tissue", "0.5", "--mpp-tolerance", "0.1",
                    "--jpeg-quality", "90", "--threads", "1"]
    return {
        "qc": ["--path", *sheet["path"], "--slide-id", *sheet["slide_id"], "--case-id", *sheet["case_id"],
               "--sheet-mpp", *mpps, "--qc-dir", str(out / "slides"), "--done-dir", str(out / "done/qc"),
               "--out", str(out / "shards/qc.json")],
        "tissue": ["--qc", str(out / "shards/qc.json"), "--preset", "biopsy", "--seg-mpp", "8",
                   "--mask-dir", str(out / "masks"), "--geojson-dir", str(out / "contours"),
                   "--thumb-dir", str(out / "thumbs"), "--done-dir", str(out / "done/tissue"),
                   "--out", str(out / "shards/tissue.json")],
        "patch": ["--qc", str(out / "shards/qc.json"), "--tissue", str(out / "shards/tissue.json"), *patch_params,
                  "--lmdb-dir", str(out / "lmdb"), "--row-dir", str(out / "rows"),
                  "--done-dir", str(out / "done/patch"), "--out", str(out / "shards/patch.json")],
    }


CLIS = {"qc": qc.cli_shard, "tissue": tissue.cli_shard, "patch": patching.cli_shard}


def run_steps(argv: dict[str, list[str]], caplog, steps=("qc", "tissue", "patch")) -> dict[str, dict[str, str]]:
    """Run the shard steps; returns step -> {slide: why it ran} (slides skipped are absent)."""
    ran: dict[str, dict[str, str]] = {}
    for step in steps:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="e2epath.preprocess.shards"):
            assert CLIS[step](argv[step]) == 0
        ran[step] = {r.args[1]: r.args[2] for r in caplog.records if r.getMessage().endswith(")")
                     and "running (" in r.getMessage()}
    return ran


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_shard_steps_write_what_the_per_slide_steps_write(slides, tmp_path, caplog):
    run_steps(shard_argv(slides, tmp_path / "sh"), caplog)
    per = tmp_path / "per"
    rows = read_json(tmp_path / "sh/shards/patch.json")
    assert [r["slide_id"] for r in rows] == list(slides["slide_id"])
    for s in slides.itertuples():
        mpp = None if s.mpp != s.mpp else s.mpp
        assert qc.cli(["--slide-id", s.slide_id, "--case-id", s.case_id, "--path", s.path, "--out",
                       str(per / f"{s.slide_id}.json")] + (["--sheet-mpp", str(mpp)] if mpp else [])) == 0
        assert read_json(per / f"{s.slide_id}.json") == read_json(tmp_path / f"sh/slides/{s.slide_id}.json")
        assert tissue.cli(["--qc", str(per / f"{s.slide_id}.json"), "--preset", "biopsy", "--seg-mpp", "8",
                           "--mask-out", str(per / "m.png"), "--geojson-out", str(per / "c.geojson"),
                           "--thumb-out", str(per / "t.png")]) == 0
        assert (per / "m.png").read_bytes() == (tmp_path / f"sh/masks/{s.slide_id}.png").read_bytes()
        assert patching.cli(["--qc", str(per / f"{s.slide_id}.json"), "--mask", str(per / "m.png"),
                             "--geojson", str(per / "c.geojson"), "--magnification", str(MAG), "--patch-size", "128",
                             "--min-tissue", "0.5", "--mpp-tolerance", "0.1", "--jpeg-quality", "90", "--threads", "2",
                             "--lmdb-out", str(per / f"{s.slide_id}.lmdb"),
                             "--row-out", str(per / "row.json")]) == 0
        row = read_json(per / "row.json")
        shard_row = next(r for r in rows if r["slide_id"] == s.slide_id)
        assert {k: v for k, v in shard_row.items() if k not in ("lmdb", "fingerprint")} == \
            {k: v for k, v in row.items() if k != "lmdb"}
        assert row["status"] == "ok" and row["n_patches"] > 0
        a, b = store.LmdbReader(per / f"{s.slide_id}.lmdb"), store.LmdbReader(shard_row["lmdb"])
        assert list(a.iter_jpegs(range(len(a)))) == list(b.iter_jpegs(range(len(b))))
        assert (a.coords == b.coords).all()


def test_a_rerun_redoes_only_the_slides_whose_inputs_changed(slides, tmp_path, caplog):
    argv = shard_argv(slides, tmp_path)
    first = run_steps(argv, caplog)
    ids = list(slides["slide_id"])
    assert all(set(ran) == set(ids) for ran in first.values()), first
    lmdb_before = mtimes(tmp_path / "lmdb")

    assert run_steps(argv, caplog) == {"qc": {}, "tissue": {}, "patch": {}}  # nothing changed
    assert mtimes(tmp_path / "lmdb") == lmdb_before

    # a slide file replaced (new mtime): that slide only, through every step
    path = Path(slides["path"][1])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = {ids[1]: "inputs or parameters changed"}
    assert run_steps(argv, caplog) == {"qc": changed, "tissue": changed, "patch": changed}
    after = mtimes(tmp_path / "lmdb")
    assert [k for k in after if after[k] != lmdb_before[k]] == [f"{ids[1]}.lmdb"]

    # a patching parameter: every slide's patches, not QC or tissue
    argv["patch"][argv["patch"].index("--min-tissue") + 1] = "0.6"
    ran = run_steps(argv, caplog)
    assert ran["qc"] == {} and ran["tissue"] == {} and set(ran["patch"]) == set(ids)

    # an output removed by hand: redone, alone
    store_path = tmp_path / f"lmdb/{ids[2]}.lmdb"
    shutil.rmtree(store_path) if store_path.is_dir() else store_path.unlink()
    assert run_steps(argv, caplog, ["patch"]) == {"patch": {ids[2]: "an output is missing"}}

    # a sheet change (case id) reaches QC and everything after it for that slide
    argv["qc"][argv["qc"].index("--case-id") + 1] = "OTHER-CASE"
    ran = run_steps(argv, caplog)
    assert {step: set(r) for step, r in ran.items()} == {"qc": {ids[0]}, "tissue": {ids[0]}, "patch": {ids[0]}}
    assert read_json(tmp_path / "shards/qc.json")[0]["case_id"] == "OTHER-CASE"


def test_a_failing_slide_fails_the_shard_after_the_others_and_a_rerun_resumes(tmp_path, caplog):
    calls: list[str] = []

    def work(sid: str, broken: bool):
        def run():
            calls.append(sid)
            if broken:
                raise RuntimeError("bug")
            (tmp_path / sid).write_text("done")
            return {"slide_id": sid, "status": "ok"}
        return run

    def items(broken: str | None) -> list[shards.Item]:
        return [shards.Item(s, {"step": "t", "slide": s}, [tmp_path / s], work(s, s == broken)) for s in "abc"]

    out = tmp_path / "table.json"
    with caplog.at_level(logging.ERROR):
        assert shards.run("t", items(broken="b"), tmp_path / "done", out) == 1
    assert calls == ["a", "b", "c"] and not out.exists()
    assert "failed on b" in caplog.text
    calls.clear()
    assert shards.run("t", items(broken=None), tmp_path / "done", out) == 0
    assert calls == ["b"]
    assert [r["slide_id"] for r in read_json(out)] == ["a", "b", "c"]
    assert all(r["fingerprint"] == shards.fingerprint({"step": "t", "slide": r["slide_id"]}) for r in read_json(out))


def test_shards_are_stable_and_adding_slides_moves_none():
    ids = [f"S{i:05d}" for i in range(2000)]
    before = shards.assign(ids, 100)
    after = shards.assign(ids + ["NEW-1", "NEW-2"], 100)
    moved = {s for shard, members in before.items() for s in members if s not in after[shard]}
    assert moved == set()
    assert shards.shard_of("S00042", 100) == f"shard{zlib.crc32(b'S00042') % 100:04d}"
    sizes = [len(m) for m in before.values()]
    assert len(before) == 100 and max(sizes) < 3 * 20
