"""Encoders and MIL aggregators: shapes, invariances, masking, the exact chunked attention plus."""
from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
import torchvision

from e2epath.models.abmilx import ABMILX, AttentionPlus, propagate_attention
from e2epath.models.aggregators import AGGREGATORS, build_aggregator
from e2epath.models.weights import build_encoder, cli_weights, fetch_imagenet, imagenet_checkpoint_paths, weights_record

IN_DIM, N_CLASSES = 24, 3
SMALL = {"abmilx": {"inner_dim": 16, "n_heads": 4}, "transmil": {"inner_dim": 16, "n_heads": 4}}
HEADS = {"abmilx": 4, "transmil": 4, "dsmil": N_CLASSES, "abmil": 1, "abmil_gated": 1, "mean": 1}


def small_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = SMALL.get(name, {"inner_dim": 16})
    return build_aggregator(name, IN_DIM, N_CLASSES, **kw).eval()


def bags(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, IN_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_logit_and_attention_shapes(name):
    model = small_model(name)
    x = bags(2, 13)
    logits, attention = model(x, return_attention=True)
    assert logits.shape == (2, N_CLASSES)
    assert attention.shape == (2, HEADS[name], 13)
    assert torch.all(attention >= 0)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, HEADS[name]))
    torch.testing.assert_close(model(x), logits)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_permutation_invariance(name):
    model = small_model(name)
    x = bags(1, 17)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(3))
    logits, attention = model(x, return_attention=True)
    logits_p, attention_p = model(x[:, perm], return_attention=True)
    torch.testing.assert_close(logits_p, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_p, attention[:, :, perm], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_padded_bag_equals_unpadded_bag(name):
    model = small_model(name)
    short, long = bags(1, 9, seed=4), bags(1, 14, seed=5)
    padding = 1e3 * bags(1, 5, seed=6)  # garbage (even NaN) must not leak into the short bag
    padding[0, 2] = float("nan")
    x = torch.cat([torch.cat([short, padding], dim=1), long])
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 9:] = False
    logits, attention = model(x, mask=mask, return_attention=True)
    alone, alone_attention = model(short, return_attention=True)
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention[:1, :, :9], alone_attention, atol=1e-6, rtol=1e-5)
    assert torch.all(attention[0, :, 9:] == 0)
    torch.testing.assert_close(logits[1:], model(long), atol=1e-5, rtol=1e-5)


def test_bad_mask_and_bad_shape_are_reported():
    model = small_model("abmilx")
    with pytest.raises(ValueError, match=r"\[B, N, 24\]"):
        model(bags(1, 5)[0])
    with pytest.raises(ValueError, match="mask must be bool"):
        model(bags(1, 5), mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="no valid instance"):
        model(bags(1, 5), mask=torch.zeros(1, 5, dtype=torch.bool))


def explicit_attention_plus(module: AttentionPlus, h, logits, mask=None):
    """Eq. 4 with the full N × N similarity matrix."""
    q, k = module.qk(module.norm(h)).chunk(2, dim=-1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return logits + (torch.softmax(scores, dim=-1) @ (module.alpha * logits).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [2048, 5])
def test_attention_plus_equals_full_matrix(chunk_size):
    torch.manual_seed(0)
    module = AttentionPlus(head_dim=8, alpha_init=0.7, chunk_size=chunk_size)
    h = torch.randn(2, 3, 23, 8)
    logits = torch.randn(2, 3, 23)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 15:] = False
    for m in (None, mask):
        expected = explicit_attention_plus(module, h, logits, m)
        got = module(h, logits, m)
        valid = slice(None) if m is None else m[:, None, :].expand_as(got)
        torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_abmilx_attention_is_softmax_of_eq4():
    torch.manual_seed(0)
    model = ABMILX(IN_DIM, N_CLASSES, inner_dim=16, n_heads=4, chunk_size=4).eval()
    x = bags(1, 11)
    _, attention = model(x, return_attention=True)
    with torch.no_grad():
        h = model.embed(x).view(1, 11, 4, 4).transpose(1, 2)  # head j = channels 4j .. 4j+3
        logits = explicit_attention_plus(model.attention_plus, h, model.attention(h))
    torch.testing.assert_close(attention, torch.softmax(logits, dim=-1), atol=1e-6, rtol=1e-5)


def test_propagation_memory_budget_keeps_it_exact(monkeypatch):
    from e2epath.models import abmilx
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    value = torch.randn(1, 2, 10, generator=g)
    expected = (torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ value.unsqueeze(-1)).squeeze(-1)
    monkeypatch.setattr(abmilx, "CHUNK_BUDGET_BYTES", 1)  # forces one query per chunk
    torch.testing.assert_close(propagate_attention(q, k, value), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected, value) and expected.abs().max() > 1e-3


def test_alpha_learns_and_chunking_keeps_gradients_exact():
    torch.manual_seed(0)
    model = ABMILX(IN_DIM, N_CLASSES, inner_dim=16, n_heads=4, chunk_size=4).eval()
    assert "attention_plus.alpha" in dict(model.named_parameters())
    x = bags(1, 19)
    model(x).logsumexp(-1).sum().backward()
    chunked = model.attention_plus.alpha.grad.clone()
    assert chunked.abs() > 0
    model.zero_grad()
    model.attention_plus.chunk_size = 4096
    model(x).logsumexp(-1).sum().backward()
    torch.testing.assert_close(chunked, model.attention_plus.alpha.grad)


def test_abmilx_without_attention_plus_has_no_alpha():
    model = ABMILX(IN_DIM, N_CLASSES, inner_dim=16, n_heads=4, attn_plus=False, ffn=True).eval()
    assert not any("alpha" in name for name, _ in model.named_parameters())
    assert model(bags(2, 7)).shape == (2, N_CLASSES)


def test_unknown_aggregator_lists_valid_names():
    with pytest.raises(ValueError, match="abmilx, abmil, abmil_gated, transmil, dsmil, mean"):
        build_aggregator("clam", IN_DIM, N_CLASSES)


def test_gradients_reach_the_encoder_end_to_end():
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", None)
    aggregator = ABMILX(encoder.out_dim, 2, inner_dim=32, n_heads=4)
    patches = torch.randn(6, 3, 32, 32)
    logits = aggregator(encoder(patches).unsqueeze(0))
    torch.nn.functional.cross_entropy(logits, torch.tensor([1])).backward()
    assert encoder.conv1.weight.grad.abs().sum() > 0
    assert encoder.layer3[-1].conv2.weight.grad.abs().sum() > 0
    assert aggregator.attention_plus.alpha.grad.abs() > 0


@pytest.mark.parametrize("name,dim", [("resnet18", 256), ("resnet50", 1024)])
def test_encoder_output_width(name, dim, caplog):
    with caplog.at_level(logging.WARNING, logger="e2epath.models.weights"):
        encoder = build_encoder(name, None).eval()
    assert "random initialisation (weights: null)" in caplog.text
    assert encoder.out_dim == dim
    assert not any(k.startswith(("layer4", "fc")) for k in encoder.state_dict())
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def offline(monkeypatch, torch_home):
    """An empty torch cache and a network that refuses every connection (an unreachable proxy)."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


def test_imagenet_missing_gives_clear_error(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_checkpoint_paths("resnet18") == [expected]
    with pytest.raises(FileNotFoundError) as err:  # a job never downloads: it names the path and the ways out
        build_encoder("resnet18", "imagenet")
    assert str(expected) in str(err.value) and "weights: <file>" in str(err.value) and "weights: null" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:  # torchvision's download is tried, and its failure said
        fetch_imagenet("resnet18")
    assert str(expected) in str(err.value) and "could not be downloaded" in str(err.value)
    assert not expected.exists()


def full_resnet18_file(path):
    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    return reference


def assert_same_trunk(encoder, reference):
    full = reference.state_dict()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, full[key], rtol=0, atol=0)


def test_imagenet_weights_from_hub_cache(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    reference = full_resnet18_file(cached)
    assert_same_trunk(build_encoder("resnet18", "imagenet"), reference)
    assert fetch_imagenet("resnet18") == cached  # found in the cache: no download tried
    record = tmp_path / "record.json"
    argv = ["--encoder", "resnet18", "--arch", "resnet18", "--weights", "imagenet", "--out", str(record)]
    assert cli_weights(argv) == 0
    rec = json.loads(record.read_text())
    assert rec == {"encoder": "resnet18", "weights": "imagenet", "path": str(cached),
                   "sha256": hashlib.sha256(cached.read_bytes()).hexdigest()}
    assert weights_record("imagenet", [record]) == {"weights": "imagenet", "path": str(cached),
                                                    "sha256": rec["sha256"]}
    assert weights_record(None, []) == {"weights": None}


def test_imagenet_record_job_fails_offline_with_an_empty_cache(tmp_path, monkeypatch, caplog):
    offline(monkeypatch, tmp_path)
    with caplog.at_level(logging.ERROR, logger="e2epath.models.weights"):
        argv = ["--encoder", "resnet50", "--arch", "resnet50", "--weights", "imagenet",
                "--out", str(tmp_path / "r.json")]
        assert cli_weights(argv) == 1
    assert "resnet50-" in caplog.text and "could not be downloaded" in caplog.text
    assert not (tmp_path / "r.json").exists()


def test_full_resnet_state_dict_file_loads(tmp_path):
    reference = full_resnet18_file(tmp_path / "r18.pth")
    assert_same_trunk(build_encoder("resnet18", str(tmp_path / "r18.pth")), reference)


def test_wrong_weights_file_is_reported(tmp_path):
    full_resnet18_file(tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="r18.pth does not fit encoder resnet50"):
        build_encoder("resnet50", str(tmp_path / "r18.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        build_encoder("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="presets: resnet18, resnet50"):
        build_encoder("vit_b_16", None)


def test_abmilx_bias_flags_follow_the_recipe():
    """attn_bias (the survival config's abx_attn_bias) gives the attention MLP zero-initialised
    biases; the grading FFN has biases (the public Mlp) unless ffn_bias is off; none elsewhere."""
    plain = build_aggregator("abmilx", IN_DIM, 2, inner_dim=16, n_heads=4)
    assert plain.attention.fc1.bias is None and plain.attention.fc2.bias is None and plain.ffn is None
    survival = build_aggregator("abmilx", IN_DIM, 2, inner_dim=16, n_heads=4, attn_bias=True)
    assert survival.attention.fc1.bias is not None and not survival.attention.fc1.bias.any()
    grading = build_aggregator("abmilx", IN_DIM, 2, inner_dim=16, n_heads=4, ffn=True)
    assert grading.ffn.fc1.bias is not None and not grading.ffn.fc2.bias.any()
    assert build_aggregator("abmilx", IN_DIM, 2, inner_dim=16, n_heads=4, ffn=True, ffn_bias=False).ffn.fc1.bias is None
    biased = {n for n, m in grading.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    assert biased == {"ffn.fc1", "ffn.fc2"}
