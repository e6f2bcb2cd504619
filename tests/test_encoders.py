"""Encoder presets: every preset builds through the code path users take and gives its documented
width; weights load from files and from a local Hugging Face cache, strictly; the foundation
models' own checkpoint layouts (Phikon-v2's transformers DINOv2, CTransPath's old-timm Swin) load
to the same outputs; E2E fine-tuning controls (trainable_blocks, gradient checkpointing).

No weights can be downloaded here: each test builds the architecture with random initialisation,
saves its state dict to a file (or a fake hub cache) and loads it back through `weights:`.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from e2epath.models import presets
from e2epath.models.checkpoints import load_checkpoint
from e2epath.models.encoders import ResNetTrunk, TimmEncoder
from e2epath.models.presets import EncoderError, encoder_spec, resolve_encoders
from e2epath.models.weights import build_encoder, hub_file, weights_record
from e2epath.train import recipe as methods
from helpers import ROOT

# Embedding widths as the model cards document them (not read from e2epath.presets).
DOCUMENTED_DIM = {"resnet18": 256, "resnet50": 1024, "uni": 1024, "uni2": 1536, "virchow2": 2560,
                  "hoptimus0": 1536, "hoptimus1": 1536, "gigapath": 1536, "ctranspath": 768, "chief": 768,
                  "phikon2": 1024}
# Hugging Face repositories of the hub presets (model cards).
HUB = {"uni": "MahmoodLab/UNI", "uni2": "MahmoodLab/UNI2-h", "virchow2": "paige-ai/Virchow2",
       "hoptimus0": "bioptimus/H-optimus-0", "hoptimus1": "bioptimus/H-optimus-1",
       "gigapath": "prov-gigapath/prov-gigapath", "phikon2": "owkin/phikon-v2"}
# The ViTs are built with fewer blocks (the same width, heads, tokens and head) to keep the tests
# small; the Swin presets, and uni in the test of widths, at full size.
REDUCED = {"uni": {"depth": 2}, "uni2": {"depth": 1}, "virchow2": {"depth": 1}, "hoptimus0": {"depth": 1},
           "hoptimus1": {"depth": 1},
           "gigapath": {"depth": 1}, "phikon2": {"depth": 2}}


def spec_of(name: str, full: bool = False, **overrides) -> dict:
    """The preset as a config's `encoders:` entry changes it (the path users take)."""
    entry = {"kwargs": REDUCED[name]} if name in REDUCED and not full else {}
    return resolve_encoders({"encoders": {name: {**entry, **overrides}}})[name]


def random_weights(spec: dict, path, seed: int = 0) -> dict:
    """A randomly initialised state dict of the preset's architecture, saved to ``path``."""
    torch.manual_seed(seed)
    model = ResNetTrunk(spec["arch"], spec) if spec["arch"].startswith("resnet") else TimmEncoder(spec).model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def batch(spec: dict, n: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, spec["input_size"], spec["input_size"])


@torch.no_grad()
def embed(encoder, x):
    return encoder.eval()(x)


def test_the_documented_presets_are_all_there():
    assert set(presets.PRESETS) == set(DOCUMENTED_DIM)
    assert {n for n, p in presets.PRESETS.items() if presets.is_hub(p.weights)} == set(HUB)
    for name, repo in HUB.items():
        assert presets.parse_hub(presets.PRESETS[name].weights)[0] == repo


@pytest.mark.parametrize("name", list(DOCUMENTED_DIM))
def test_every_preset_builds_and_gives_its_documented_width(name, tmp_path):
    spec = spec_of(name, full=name == "uni")
    path = tmp_path / f"{name}.safetensors"
    random_weights(spec, path)
    encoder = build_encoder(spec, str(path))
    out = embed(encoder, batch(spec))
    assert out.shape == (2, DOCUMENTED_DIM[name]) == (2, encoder.out_dim)
    assert torch.isfinite(out).all()


def test_a_foundation_model_never_gets_random_weights():
    with pytest.raises(EncoderError, match="foundation model"):
        build_encoder(spec_of("uni"), None)
    config = {"encoders": {"uni": {"weights": None}}, "twostage": {"encoders": ["uni"]}}
    with pytest.raises(methods.ConfigError, match="uni is a foundation model"):
        methods.feature_encoders(config)
    with pytest.raises(EncoderError, match="imagenet is for resnet18 / resnet50"):
        build_encoder(spec_of("uni"), "imagenet")


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "pth-wrapped", "pt-module"])
def test_weights_files_load_to_the_same_features(fmt, tmp_path):
    spec = spec_of("virchow2")
    raw = tmp_path / "raw.pt"
    state = random_weights(spec, raw, seed=3)
    reference = build_encoder(spec, str(raw))
    path = tmp_path / {"safetensors": "w.safetensors", "bin": "pytorch_model.bin", "pth-wrapped": "w.pth",
                       "pt-module": "w.pt"}[fmt]
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "bin":
        torch.save(state, path)
    elif fmt == "pth-wrapped":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    x = batch(spec)
    torch.testing.assert_close(embed(build_encoder(spec, str(path)), x), embed(reference, x), rtol=0, atol=0)


def test_virchow2_embedding_is_class_token_and_mean_patch_token(tmp_path):
    spec = spec_of("virchow2")
    random_weights(spec, tmp_path / "w.pt")
    encoder = build_encoder(spec, str(tmp_path / "w.pt")).eval()
    x = batch(spec)
    with torch.no_grad():
        tokens = encoder.model.forward_features(x)  # [class, 4 registers, 256 patches]
    assert tokens.shape[1] == 1 + 4 + (224 // 14) ** 2
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
    torch.testing.assert_close(embed(encoder, x), expected)


def fake_hub(cache, repo: str, file: str, state: dict) -> None:
    """A local Hugging Face cache laid out as huggingface_hub writes it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save(state, snapshot / file)


def test_hub_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    spec = spec_of("uni")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:  # not cached: where it was looked for, and how to get it
        build_encoder(spec)
    text = str(err.value)
    assert str(cache / "models--MahmoodLab--UNI") in text and "hf download MahmoodLab/UNI pytorch_model.bin" in text
    assert "weights: <path>" in text
    state = random_weights(spec, tmp_path / "ref.pt", seed=5)
    fake_hub(cache, "MahmoodLab/UNI", "pytorch_model.bin", state)
    x = batch(spec)
    from_hub = build_encoder(spec)  # the preset's default: hf:MahmoodLab/UNI/pytorch_model.bin
    torch.testing.assert_close(embed(from_hub, x), embed(build_encoder(spec, str(tmp_path / "ref.pt")), x),
                               rtol=0, atol=0)
    assert hub_file(spec["weights"]).parent.parent.name == "snapshots"
    # the record job hashes the cached file; the record is what jobs write into their outputs
    from e2epath.models.weights import cli_weights

    record = tmp_path / "uni.json"
    assert cli_weights(["--encoder", "uni", "--arch", spec["arch"], "--weights", spec["weights"],
                        "--out", str(record)]) == 0
    rec = json.loads(record.read_text())
    import hashlib

    assert rec["sha256"] == hashlib.sha256(hub_file(spec["weights"]).read_bytes()).hexdigest()
    assert weights_record(spec["weights"], [record])["sha256"] == rec["sha256"]


def test_a_checkpoint_that_does_not_fit_fails_naming_file_and_encoder(tmp_path):
    spec = spec_of("hoptimus0")
    state = random_weights(spec, tmp_path / "ok.pt")
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.0.mlp.fc2.weight"},
                    "missing keys: blocks.0.mlp.fc2.weight"),
        "unexpected": ({**state, "blocks.0.extra.weight": torch.zeros(3)}, "unexpected keys: blocks.0.extra.weight"),
        "shape": ({**state, "pos_embed": state["pos_embed"][:, :10]}, "shape mismatches (file vs encoder): pos_embed"),
    }
    for what, (bad, needle) in cases.items():
        path = tmp_path / f"{what}.pt"
        torch.save(bad, path)
        with pytest.raises(EncoderError) as err:
            build_encoder(spec, str(path))
        assert str(path) in str(err.value) and "encoder hoptimus0" in str(err.value), what
        assert needle in str(err.value), (what, str(err.value))
    # another architecture's checkpoint: UNI's ViT-L/16 into H-optimus-0's ViT-g/14
    random_weights(spec_of("uni"), tmp_path / "uni.pt")
    with pytest.raises(EncoderError, match=r"uni\.pt does not fit encoder hoptimus0"):
        build_encoder(spec, str(tmp_path / "uni.pt"))
    with pytest.raises(FileNotFoundError, match="nowhere.pt does not exist"):
        build_encoder(spec, str(tmp_path / "nowhere.pt"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match=r"junk\.bin cannot be read"):
        load_checkpoint(tmp_path / "junk.bin", "hoptimus0")


def test_phikon2_loads_a_transformers_dinov2_checkpoint(tmp_path):
    """The real Phikon-v2 is a transformers Dinov2Model: a (reduced) one of the same shape, its
    state dict as transformers saves it, gives the same class token through the preset."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096,
                          patch_size=16, image_size=224, layerscale_value=1e-5)
    hf = Dinov2Model(config).eval()
    for p in hf.parameters():  # layer scales and biases away from their init, so every key matters
        p.data.add_(torch.randn_like(p) * 0.02)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    spec = spec_of("phikon2")
    x = batch(spec)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(embed(build_encoder(spec, str(tmp_path / "model.safetensors")), x), expected,
                               rtol=1e-4, atol=1e-4)
    # the layout transformers 4 wrote (attention.attention.query ..., attention.output.dense)
    v4 = {}
    for key, value in state.items():
        key = key.replace("attention.q_proj", "attention.attention.query").replace(
            "attention.k_proj", "attention.attention.key").replace("attention.v_proj", "attention.attention.value")
        v4[key.replace("attention.o_proj", "attention.output.dense")] = value
    assert v4.keys() != state.keys()
    torch.save(v4, tmp_path / "v4.bin")
    torch.testing.assert_close(embed(build_encoder(spec, str(tmp_path / "v4.bin")), x), expected,
                               rtol=1e-4, atol=1e-4)


def test_ctranspath_loads_its_authors_checkpoint_layout(tmp_path):
    """CTransPath's release: weights under "model", saved by the old timm Swin (patch merging at the
    end of a stage, relative-position index and attention-mask buffers, a classifier head)."""
    spec = spec_of("ctranspath")
    state = random_weights(spec, tmp_path / "new.pt", seed=4)
    encoder = build_encoder(spec, str(tmp_path / "new.pt"))
    assert [k for k in state if k.startswith("patch_embed.proj.")][:3] == [
        "patch_embed.proj.0.weight", "patch_embed.proj.1.weight", "patch_embed.proj.1.bias"]
    old = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":  # timm: stage i+1 starts with it; old: stage i ends
            parts[1] = str(int(parts[1]) - 1)
        old[".".join(parts)] = value
    for i, depth in enumerate((2, 2, 6, 2)):
        for j in range(depth):
            old[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
            if j % 2:
                old[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 49, 49)
    old["head.weight"], old["head.bias"] = torch.zeros(1000, 768), torch.zeros(1000)
    torch.save({"model": old}, tmp_path / "ctranspath.pth")
    x = batch(spec)
    torch.testing.assert_close(embed(build_encoder(spec, str(tmp_path / "ctranspath.pth")), x), embed(encoder, x),
                               rtol=0, atol=0)


def vit_tiny(**overrides) -> dict:
    return encoder_spec("vit", {"arch": "timm:vit_tiny_patch16_224", "dim": 192, "input_size": 32,
                                "kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "num_classes": 0},
                                **overrides})


def test_trainable_blocks_freeze_all_but_the_last_k(tmp_path):
    encoder = build_encoder(vit_tiny(), None)
    encoder.set_trainable_blocks(1)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.blocks.2.", "model.norm.")) for n in trainable), trainable
    assert any(n.startswith("model.blocks.2.") for n in trainable) and "model.norm.weight" in trainable
    resnet = build_encoder("resnet18", None)
    resnet.set_trainable_blocks(2)  # layer3's two blocks
    assert {n.split(".")[0] + "." + n.split(".")[1] for n, p in resnet.named_parameters() if p.requires_grad} == \
        {"layer3.0", "layer3.1"}
    resnet.train()
    assert not resnet.bn1.training and not resnet.layer2[1].bn2.training  # frozen BatchNorm keeps its statistics
    assert resnet.layer3[1].bn2.training
    with pytest.raises(EncoderError, match="trainable_blocks 9 is not between 0 and its 3 blocks"):
        build_encoder(vit_tiny(), None).set_trainable_blocks(9)


@pytest.mark.parametrize("name", ["vit", "resnet18"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    grads = []
    for checkpointing in (False, True):
        encoder = build_encoder(vit_tiny() if name == "vit" else "resnet18", None, seed=0).train()
        encoder.set_grad_checkpointing(checkpointing)
        torch.manual_seed(2)
        encoder(torch.randn(4, 3, 32, 32)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-5)


def test_config_encoders_are_checked_with_the_key_and_the_fix():
    base = {"samples": "s.tsv", "tasks": {"t": {"type": "classification", "labels": "l.csv"}},
            "e2e": {"defaults": {}, "methods": {}}, "sweeps": {},
            "twostage": {"encoders": ["resnet50"], "magnification": 20, "defaults": {}, "methods": {}}}

    def resolve(**changes):
        config = json.loads(json.dumps(base))
        for key, value in changes.items():
            section, _, rest = key.partition("__")
            if rest:
                config[section][rest] = value
            else:
                config[section] = value
        return methods.resolve(config)

    with pytest.raises(methods.ConfigError, match="encoder 'vit' is neither a preset nor in the config's encoders"):
        resolve(e2e__methods={"m": {"encoder": "vit", "aggregator": "abmilx"}})
    with pytest.raises(methods.ConfigError, match=r"encoder 'uni' is not in twostage.encoders \['resnet50'\]"):
        resolve(twostage__methods={"m": {"encoder": "uni", "aggregator": "abmil"}})
    with pytest.raises(methods.ConfigError, match="not a preset .* so it needs arch and dim"):
        resolve(encoders={"vit": {"weights": None}})
    with pytest.raises(methods.ConfigError, match="kwargs.mlp_layer 'os.system' is not one of"):
        resolve(encoders={"uni": {"kwargs": {"mlp_layer": "os.system"}}})
    specs = resolve(encoders={"vit": {"arch": "timm:vit_small_patch16_224", "dim": 384, "weights": "w.safetensors"}},
                    twostage__encoders=["resnet50", "uni", "vit"],
                    twostage__methods={"ts_uni": {"encoder": "uni", "aggregator": "abmil"},
                                       "ts_vit": {"encoder": "vit", "aggregator": "abmil"},
                                       "ts_r50": {"aggregator": "abmil"}},
                    e2e__methods={"vit_abmilx": {"encoder": "vit", "aggregator": "abmilx", "trainable_blocks": 2,
                                                 "grad_checkpointing": True}})["t"]
    assert specs["ts_uni"]["lr"] == 1e-4 and specs["ts_r50"]["lr"] == 2e-4  # B.3: FM features at 1e-4
    assert specs["ts_vit"]["lr"] == 2e-4 and specs["ts_vit"]["weights"] == "w.safetensors"
    assert specs["ts_r50"]["encoder"] == "resnet50"  # the first of twostage.encoders
    e2e = specs["vit_abmilx"]
    assert (e2e["trainable_blocks"], e2e["grad_checkpointing"], e2e["encoder_spec"]["dim"]) == (2, True, 384)
    assert "licence" not in e2e["encoder_spec"]  # prose never reruns a job


def test_encoders_command_lists_presets_as_users_run_it(tmp_path):
    res = subprocess.run([sys.executable, "-m", "e2epath", "encoders"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert set(lines) == set(DOCUMENTED_DIM)
    for name, dim in DOCUMENTED_DIM.items():
        assert f" {dim} " in lines[name], lines[name]
    assert "models--MahmoodLab--UNI/snapshots/*/pytorch_model.bin" in lines["uni"]
    assert "give weights: <file>" in lines["ctranspath"]
    config = tmp_path / "c.yaml"
    config.write_text("encoders:\n  vit: {arch: 'timm:vit_small_patch16_224', dim: 384, weights: /w/vit.safetensors}\n")
    res = subprocess.run([sys.executable, "-m", "e2epath", "encoders", "--config", str(config), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert listed["vit"]["dim"] == 384 and listed["vit"]["weights"] == "/w/vit.safetensors" and "uni" in listed
