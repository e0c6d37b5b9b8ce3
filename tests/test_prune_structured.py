import pytest
import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.models import cnn_teacher, load_weights, mlp_teacher, save_weights
from torchslim.prune import Attention, plan, structured
from zoo import ZOO

ALL = {"mlp": mlp_teacher, "cnn": cnn_teacher, **ZOO}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture
def images():
    from torchslim.data import fashion_mnist

    return fashion_mnist.load(eval_subset=16).test.tensors[0]


def seeded(name):
    torch.manual_seed(0)
    return ALL[name]().eval()


@pytest.mark.parametrize("name", sorted(ALL))
def test_zoo_prunes_runs_and_shrinks(name, images):
    model = seeded(name)
    before = n_params(model)
    structured(model, images[:2], ratio=0.5)
    out = model(images)
    assert out.shape == (16, 10)
    assert n_params(model) < 0.7 * before, (n_params(model), before)


@pytest.mark.parametrize("name", sorted(ALL))
def test_ratio_zero_keeps_the_function(name, images):
    model = seeded(name)
    reference = model(images)
    structured(model, images[:2], ratio=0.0)
    assert torch.allclose(model(images), reference, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_pruned_model_reloads_from_its_file(name, images, tmp_path):
    model = structured(seeded(name), images[:2], ratio=0.4, importance="l2")
    save_weights(model, tmp_path / "pruned.safetensors")
    fresh = load_weights(ALL[name](), tmp_path / "pruned.safetensors").eval()  # original architecture
    assert n_params(fresh) == n_params(model)
    assert torch.equal(fresh(images), model(images))


def test_cnn_teacher_half_channels_removes_three_quarters_of_parameters(images):
    model = cnn_teacher().eval()
    before = n_params(model)
    structured(model, images[:2], ratio=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert model.classifier[-1].out_features == 10  # the classifier's outputs are kept by default
    assert 1 - n_params(model) / before >= 0.70


def test_residual_groups_share_one_decision(images):
    model = ZOO["resnet"]().eval()
    structured(model, images[:2], ratio=0.5)
    b = model.layer1[0]
    # stem, both layer1 blocks' second convs and the identity shortcut are one coupled group
    assert model.stem[0].out_channels == b.conv2.out_channels == model.layer1[1].conv2.out_channels == 8
    assert model.layer2[0].shortcut[0].out_channels == model.layer2[0].conv2.out_channels == 16


def test_depthwise_grouped_groupnorm_and_concat(images):
    mb = ZOO["mobilenetv2"]().eval()
    structured(mb, images[:2], ratio=0.5)
    dw = mb.features[3].block[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 16
    dn = ZOO["densenet"]().eval()
    structured(dn, images[:2], ratio=0.5)
    assert dn.norm.num_channels == dn.grouped.in_channels and dn.norm.num_channels % 4 == 0
    assert dn.grouped.out_channels % 4 == 0 and dn.grouped.weight.shape[1] == dn.grouped.in_channels // 4
    assert dn(images).shape == (16, 10)


def test_attention_heads_and_attributes_are_updated(images):
    model = ZOO["transformer"]().eval()
    structured(model, images[:2], ratio=0.5)
    attn = model.layers[0].attn
    assert isinstance(attn, Attention) and attn.num_heads == 2 and attn.head_dim == 8
    assert attn.q_proj.out_features == 16 and attn.out_proj.in_features == 16
    assert model.layers[0].ffn[0].out_features == 32
    assert (
        attn.embed_dim == model.norm.normalized_shape[0] == model.pos.shape[-1]
    )  # residual stream kept: pos is a raw parameter


def test_ignore_minimum_and_rounding(images):
    model = cnn_teacher().eval()
    structured(model, images[:2], ratio=0.9, ignore=["features.0"], min_channels=16, round_to=8)
    assert model.features[0].out_channels == 64
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)][1:]
    assert all(w >= 16 and w % 8 == 0 for w in widths)


def test_per_layer_ratios_and_global_ranking(images):
    model = cnn_teacher().eval()
    structured(model, images[:2], ratio={"features.0": 0.75, "default": 0.0})
    assert model.features[0].out_channels == 16 and model.features[3].out_channels == 64
    torch.manual_seed(0)
    model = cnn_teacher().eval()
    before = n_params(model)
    structured(model, images[:2], ratio=0.5, global_ranking=True)
    assert n_params(model) < before


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "random"])
def test_criteria_choose_lowest_scores(criterion, images):
    torch.manual_seed(0)
    model = cnn_teacher().eval()
    with torch.no_grad():
        model.features[0].weight[:8] *= 0.0  # eight dead channels
        model.features[1].weight[:8] = 0.0
    p = plan(model, images[:2], ratio=0.125, importance=criterion)
    first = next(g for g in p.groups if g.producers == ("features.0",))
    if criterion != "random":
        assert first.remove == list(range(8))
    assert len(first.remove) == 8


def test_taylor_needs_data_and_uses_gradients(images):
    from torch.utils.data import DataLoader, TensorDataset

    from torchslim.train import cross_entropy_loss

    with pytest.raises(TorchslimError, match="taylor"):
        structured(cnn_teacher(), images[:2], importance="taylor")
    labels = torch.arange(16) % 10
    model = cnn_teacher()
    structured(
        model,
        images[:2],
        ratio=0.5,
        importance="taylor",
        data=DataLoader(TensorDataset(images, labels), batch_size=8),
        loss_fn=cross_entropy_loss(),
    )
    assert model.features[0].out_channels == 32 and all(p.grad is None for p in model.parameters())


def test_untraceable_model_names_the_construct(images):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x.flatten(1))
            return -self.fc(x.flatten(1))

    with pytest.raises(TorchslimError, match=r"cannot capture Branchy .*test_prune_structured.py:\d+.*data-dependent"):
        structured(Branchy(), images[:2])
