"""Embedding models: shapes, unit-norm embeddings, seeded construction, bad specs."""

import pytest
import torch

from backfill_lib.models import ARCHITECTURES, EmbeddingModel, ModelSpec, build_model, cifar_resnet


@pytest.mark.parametrize("arch,input_shape", [
    ("mlp", (1, 8, 8)), ("mlp", (5,)), ("small_cnn", (1, 8, 8)), ("resnet18", (3, 32, 32)), ("resnet50", (3, 32, 32)),
    ("pooled_cnn", (1, 28, 28)), ("pooled_cnn", (1, 8, 8)), ("pooled_cnn", (3, 32, 32)),
])
def test_shapes_and_unit_norm(arch, input_shape):
    model = build_model(ModelSpec(arch, embed_dim=12, width=8), input_shape, num_classes=7, seed=0).eval()
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, logits = model(x)
        e = model.embed(x)
    assert z.shape == e.shape == (2, 12) and logits.shape == (2, 7)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(z, e)
    torch.testing.assert_close(model.classify(model.features(x)), logits)
    assert model.embed_dim == 12


def test_resnet_uses_the_cifar_stem():
    net, feat = cifar_resnet(18)
    assert feat == 512 and net.conv1.stride == (1, 1) and net.conv1.kernel_size == (3, 3)
    assert isinstance(net.maxpool, torch.nn.Identity) and isinstance(net.fc, torch.nn.Identity)
    assert cifar_resnet(50)[1] == 2048
    with pytest.raises(ValueError, match="depth must be 18 or 50"):
        cifar_resnet(34)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    spec = ModelSpec("small_cnn", 8, 4)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(spec, (1, 8, 8), 5, seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    b, c = build_model(spec, (1, 8, 8), 5, seed=1), build_model(spec, (1, 8, 8), 5, seed=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embedding.weight, c.embedding.weight)


def test_classify_applies_this_classifier_to_other_embeddings():
    old = build_model(ModelSpec("mlp", 6, 4), (3,), 4, seed=0)
    z = torch.randn(5, 6)
    torch.testing.assert_close(old.classify(z), old.classifier(z))
    with pytest.raises(ValueError, match="z has dimension 7 but this classifier expects 6"):
        old.classify(torch.randn(5, 7))


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown arch 'vit'; choose one of: " + ", ".join(ARCHITECTURES)):
        build_model(ModelSpec("vit"), (3, 32, 32), 10)
    with pytest.raises(ValueError, match="embed_dim must be positive"):
        EmbeddingModel(ModelSpec("mlp", embed_dim=0), (4,), 2)
    with pytest.raises(ValueError, match=r"arch 'small_cnn' needs image inputs \(C, H, W\), got input_shape \(4,\)"):
        build_model(ModelSpec("small_cnn"), (4,), 2)


def test_spec_to_dict():
    assert ModelSpec("mlp", 16, 32).to_dict() == {"arch": "mlp", "embed_dim": 16, "width": 32}


def _conv_macs(model, input_shape):
    """Multiply-adds of the convolutions of one image, and the side of each convolution's input."""
    macs, sides = [], []

    def hook(module, inputs, output):
        sides.append(inputs[0].shape[-1])
        macs.append(output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for h in handles:
        h.remove()
    return sum(macs), sides


def test_pooled_cnn_halves_the_resolution_after_each_of_its_first_blocks():
    pooled = build_model(ModelSpec("pooled_cnn", 32, 32), (1, 28, 28), 10, seed=0)
    small = build_model(ModelSpec("small_cnn", 32, 32), (1, 28, 28), 10, seed=0)
    macs, sides = _conv_macs(pooled, (1, 28, 28))
    small_macs, small_sides = _conv_macs(small, (1, 28, 28))
    assert sides == [28, 14, 7] and small_sides == [28, 28, 14]
    assert [m.out_channels for m in pooled.modules() if isinstance(m, torch.nn.Conv2d)] == [32, 64, 128]
    assert round(macs / 1e6, 1) == 7.5 and round(small_macs / 1e6) == 29  # the figures of ModelSpec's docstring
    assert _conv_macs(build_model(ModelSpec("pooled_cnn", 32, 16), (1, 28, 28), 10, seed=0), (1, 28, 28))[0] < 2e6
    # the last 3×3 map is flattened, not averaged: the embedding layer sees where a feature is
    assert pooled.embedding.in_features == 128 * 3 * 3
    assert build_model(ModelSpec("pooled_cnn", 8, 4), (3, 32, 20), 5, seed=0).embedding.in_features == 16 * 4 * 2
    with pytest.raises(ValueError, match=r"needs at least 8×8 pixels, got input_shape \(1, 7, 28\)"):
        build_model(ModelSpec("pooled_cnn"), (1, 7, 28), 2)


def test_spec_to_dict_of_the_added_arch():
    assert ModelSpec("pooled_cnn", 32, 16).to_dict() == {"arch": "pooled_cnn", "embed_dim": 32, "width": 16}
