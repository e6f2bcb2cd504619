"""Feature extraction on real LMDB patch stores (written with LmdbWriter, real JPEGs).

The reference forward decodes the LMDB with py-lmdb + OpenCV itself and runs a torchvision
ResNet's conv1 … layer3 + average pooling directly, so it shares no code with the pipeline.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

import helpers
from e2epath.features import extraction as features
from e2epath.preprocess.store import LmdbReader, close_all
from helpers import ROOT

PATCH, INPUT = 48, 32  # stored patch px, encoder input px (so the resize is exercised)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def textured_patches(n: int, seed: int) -> list[np.ndarray]:
    """Smooth random RGB images (JPEG-friendly, but every patch different)."""
    rng = np.random.default_rng(seed)
    return [cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (PATCH, PATCH),
                       interpolation=cv2.INTER_CUBIC) for _ in range(n)]


def write_store(folder: Path, slide: str, mag: int, patches: list[np.ndarray], status: str = "ok",
                message: str = "") -> Path:
    """A store + its manifest row (tests/helpers.py); patches 1000 level-0 px apart."""
    return helpers.write_store(folder, slide, mag, patches, status, message, x_step=1000)


def run(rows: list[Path], out: Path, *extra: str, encoder: str = "resnet18", mag: int = 20,
        weights: str | None = None) -> dict:
    argv = ["--rows", *map(str, rows), "--out", str(out), "--encoder", encoder, "--magnification", str(mag),
            *(["--weights", weights] if weights else []), "--input-size", str(INPUT), "--batch-size", "8", "--seed",
            "3", "--workers", "2", *extra]
    assert features.cli(argv) == 0
    return torch.load(out, map_location="cpu", weights_only=True)


def decode_store(path: Path, n: int) -> np.ndarray:
    """The store's patches, decoded here: uint8 [n, PATCH, PATCH, 3], and their coords."""
    close_all()  # py-lmdb opens a file once per process
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        rgb = [cv2.cvtColor(cv2.imdecode(np.frombuffer(txn.get(b"%08d" % i), np.uint8), cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB) for i in range(n)]
        coords = np.frombuffer(txn.get(b"__coords__"), "<i4").reshape(-1, 2)
    env.close()
    return np.stack(rgb), coords


@torch.no_grad()
def torchvision_trunk(arch: str, state: dict, rgb: np.ndarray) -> torch.Tensor:
    """conv1 … layer3 + average pooling of a torchvision ResNet on ``rgb`` normalised with ImageNet
    statistics and resized to INPUT px by torch's own bilinear interpolation."""
    net = getattr(torchvision.models, arch)(weights=None)
    net.load_state_dict(state, strict=False)
    net.eval()
    x = torch.from_numpy((rgb.astype(np.float32) / 255 - MEAN) / STD).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(INPUT, INPUT), mode="bilinear", align_corners=False)
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer3(net.layer2(net.layer1(x))).mean(dim=(2, 3))


def test_features_match_a_direct_resnet50_forward_and_are_deterministic(tmp_path):
    n = 21  # not a multiple of the batch size: the last batch is short
    row = write_store(tmp_path, "s1", 20, textured_patches(n, seed=1))
    torch.manual_seed(11)
    net = torchvision.models.resnet50(weights=None)
    for m in net.modules():  # non-trivial BN statistics, so a wrong normalisation shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    torch.save(state, tmp_path / "trunk.pt")
    rgb, coords = decode_store(tmp_path / "lmdb/20x/s1.lmdb", n)
    expected = torchvision_trunk("resnet50", state, rgb)

    a = run([row], tmp_path / "a.pt", encoder="resnet50", weights=str(tmp_path / "trunk.pt"))
    b = run([row], tmp_path / "b.pt", "--workers", "0", encoder="resnet50", weights=str(tmp_path / "trunk.pt"))
    assert a["status"] == "ok" and a["slide_id"] == "s1" and a["magnification"] == 20
    assert a["features"].dtype == torch.float16 and a["features"].shape == (n, 1024)
    assert a["coords"].dtype == torch.int32 and np.array_equal(a["coords"].numpy(), coords)
    assert torch.equal(a["features"], b["features"])  # same input → same features, whatever the threads
    torch.testing.assert_close(a["features"].float(), expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


def test_random_init_is_the_same_encoder_in_every_job(tmp_path):
    """Two slides with the same patches, extracted in separate processes → the same features;
    another seed → other features (so the comparison can fail)."""
    patches = textured_patches(6, seed=2)
    rows = [write_store(tmp_path, s, 20, patches) for s in ("a", "b")]
    cmd = [sys.executable, "-m", "e2epath", "extract_features", "--rows", str(rows[0]), "--out",
           str(tmp_path / "a.pt"), "--encoder", "resnet18", "--magnification", "20",
           "--input-size", str(INPUT), "--batch-size", "4", "--seed", "3", "--workers", "2"]
    res = subprocess.run(cmd, cwd=ROOT / "workflow", capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    torch.rand(1000)  # this process's RNG is elsewhere: the job must seed the init itself
    b = run([rows[1]], tmp_path / "b.pt", "--batch-size", "4")
    other = run([rows[1]], tmp_path / "c.pt", "--batch-size", "4", "--seed", "4")
    assert a["slide_id"] == "a" and b["slide_id"] == "b"
    assert a["features"].shape == (6, 256)
    assert torch.equal(a["features"], b["features"])
    assert not torch.allclose(a["features"].float(), other["features"].float(), rtol=0.05)


def test_falls_back_to_the_finest_usable_coarser_magnification(tmp_path, caplog):
    rows = [write_store(tmp_path, "s", 5, textured_patches(3, seed=5)),
            write_store(tmp_path, "s", 10, textured_patches(7, seed=10)),
            write_store(tmp_path, "s", 20, [], status="unavailable", message="finer than the scan")]
    with caplog.at_level(logging.WARNING, logger="e2epath.features.extraction"):
        rec = run(rows, tmp_path / "s.pt")
    assert rec["status"] == "ok" and rec["magnification"] == 10
    assert rec["features"].shape == (7, 256)
    assert "20x is unavailable" in rec["message"] and "falling back to 10x" in rec["message"]
    assert "falling back to 10x" in caplog.text
    expected = LmdbReader(tmp_path / "lmdb/10x/s.lmdb").coords
    assert np.array_equal(rec["coords"].numpy(), expected)


def test_a_slide_that_failed_preprocessing_is_skipped_and_left_out_of_training(tmp_path, caplog):
    good = run([write_store(tmp_path, "good", 20, textured_patches(4, seed=0))], tmp_path / "good.pt")
    rows = [write_store(tmp_path, "bad", m, [], status="failed", message="QC failed: not a slide")
            for m in (10, 20)]
    with caplog.at_level(logging.WARNING, logger="e2epath.features.extraction"):
        bad = run(rows, tmp_path / "bad.pt")
    assert bad["status"] == "skipped" and bad["slide_id"] == "bad" and len(bad["features"]) == 0
    assert "20x is failed (QC failed: not a slide)" in bad["message"] and "no magnification" in bad["message"]
    assert "bad" in caplog.text and "no magnification is usable" in caplog.text

    from e2epath.features.files import load_feature_bags  # the consumer of these files

    sheet = tmp_path / "slides.tsv"
    pd.DataFrame({"slide_id": ["good", "bad"], "case_id": ["c1", "c2"]}).to_csv(sheet, sep="\t", index=False)
    files = [str(tmp_path / "good.pt"), str(tmp_path / "bad.pt")]
    bags, encoders = load_feature_bags(str(sheet), files, {"c1", "c2"}, "case")
    assert set(bags) == {"c1"} and bags["c1"].features.shape == good["features"].shape and bags["c1"].case_id == "c1"
    assert [s for s, _ in bags["c1"].parts] == ["good"] and len(encoders) == 1
    slides, _ = load_feature_bags(str(sheet), files, {"c1", "c2"}, "slide")
    assert set(slides) == {"good"} and slides["good"].case_id == "c1"


def test_a_damaged_patch_fails_the_slide_with_its_index(tmp_path):
    row = write_store(tmp_path, "s", 20, textured_patches(5, seed=3))
    close_all()
    env = lmdb.open(str(tmp_path / "lmdb/20x/s.lmdb"), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"%08d" % 3, b"not a jpeg")
    env.close()
    rec = run([row], tmp_path / "s.pt")
    assert rec["status"] == "failed" and "patch 3" in rec["message"] and "s.lmdb" in rec["message"]


def test_background_decoding_keeps_the_order(tmp_path):
    row = json.loads(write_store(tmp_path, "s", 20, textured_patches(11, seed=4)).read_text())
    store = LmdbReader(row["lmdb"])
    inline = torch.cat(list(features.PatchBatches(store, 3, workers=0)))
    threaded = torch.cat(list(features.PatchBatches(store, 3, workers=3)))
    rgb, _ = decode_store(Path(row["lmdb"]), 11)
    assert inline.shape == (11, PATCH, PATCH, 3)  # decoded at the stored size; resized on the device
    assert torch.equal(inline, threaded) and np.array_equal(inline.numpy(), rgb)


def test_rows_of_different_slides_are_refused(tmp_path):
    rows = [write_store(tmp_path, s, 20, textured_patches(1, seed=0)) for s in ("a", "b")]
    with pytest.raises(SystemExit):
        run(rows, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
