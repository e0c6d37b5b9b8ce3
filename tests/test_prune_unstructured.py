import pytest
import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.models import cnn_teacher, load_weights, mlp_teacher, save_weights
from torchslim.models.sparse import save_sparse
from torchslim.prune.sparsity import schedule, unstructured
from torchslim.train import TrainConfig, cross_entropy_loss, fit


def weight_sparsity(model):
    layers = unstructured.prunable_layers(model).values()
    return sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_masks_hit_the_target_and_remove_small_weights(scope):
    torch.manual_seed(0)
    model = mlp_teacher()
    masks = unstructured.magnitude_masks(model, 0.8, scope)
    unstructured.apply_masks(model, masks)
    assert abs(weight_sparsity(model) - 0.8) < 1e-3
    if scope == "layer":
        for row in unstructured.layer_sparsity(model):
            assert abs(row["sparsity"] - 0.8) < 1e-3
    # every kept weight is at least as large as every removed one (globally or per layer)
    torch.manual_seed(0)
    original = mlp_teacher()  # the same seeded weights before pruning
    for name, m in unstructured.prunable_layers(model).items():
        w0 = dict(original.named_modules())[name].weight.abs()
        kept, gone = w0[masks[name]], w0[~masks[name]]
        if scope == "layer":
            assert kept.min() >= gone.max()
    if scope == "global":
        every = [(dict(original.named_modules())[n].weight.abs(), masks[n]) for n in masks]
        assert min(w[k].min() for w, k in every) >= max(w[~k].max() for w, k in every)


def test_random_masks_are_seeded():
    a = unstructured.magnitude_masks(mlp_teacher(), 0.5, random=True, generator=torch.Generator().manual_seed(1))
    b = unstructured.magnitude_masks(mlp_teacher(), 0.5, random=True, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_four_pattern():
    torch.manual_seed(0)
    model = cnn_teacher()
    masks = unstructured.nm_masks(model, 2, 4)
    assert "features.0" not in masks  # one input channel: not a multiple of 4, skipped
    unstructured.apply_masks(model, masks)
    w = model.features[3].weight.movedim(1, -1).reshape(-1, 4)
    assert torch.all((w != 0).sum(1) <= 2)
    lin = model.classifier[2].weight.reshape(-1, 4)
    assert torch.all((lin != 0).sum(1) == 2)


def test_masks_hold_during_fine_tuning(small_data):
    torch.manual_seed(0)
    model = mlp_teacher()
    handles = unstructured.apply_masks(model, unstructured.magnitude_masks(model, 0.9))
    zeros = {n: m.weight == 0 for n, m in unstructured.prunable_layers(model).items()}
    fit(model, small_data.train, TrainConfig(epochs=1, lr=1e-3), loss_fn=cross_entropy_loss(), batch_size=128)
    unstructured.remove_masks(handles)
    for name, m in unstructured.prunable_layers(model).items():
        assert torch.all(m.weight[zeros[name]] == 0)
    assert abs(weight_sparsity(model) - 0.9) < 1e-3


def test_ninety_percent_sparse_artifact_is_small_and_exact(tmp_path, small_data):
    torch.manual_seed(0)
    model = cnn_teacher().eval()
    dense = save_weights(model, tmp_path / "dense.safetensors").stat().st_size
    unstructured.apply_masks(model, unstructured.magnitude_masks(model, 0.9))
    sparse = save_sparse(model, tmp_path / "sparse.safetensors").stat().st_size
    assert sparse <= 0.25 * dense, (sparse, dense)
    back = load_weights(cnn_teacher(), tmp_path / "sparse.safetensors").eval()
    x = small_data.test.tensors[0][:64]
    assert torch.equal(back(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_bad_amounts_are_errors():
    with pytest.raises(TorchslimError, match="sparsity"):
        unstructured.magnitude_masks(mlp_teacher(), 1.0)
    with pytest.raises(TorchslimError, match="N:M"):
        unstructured.nm_masks(mlp_teacher(), 4, 4)
    with pytest.raises(TorchslimError, match="no Linear or Conv"):
        unstructured.magnitude_masks(nn.Sequential(nn.ReLU()), 0.5)


def test_gradual_schedule_follows_zhu_gupta():
    s_i, s_f, n = 0.1, 0.9, 5
    got = schedule.gradual(s_f, n, s_i)
    for t, value in enumerate(got, start=1):
        assert value == pytest.approx(s_f + (s_i - s_f) * (1 - t / n) ** 3)
    assert got[-1] == pytest.approx(s_f)
    assert all(b > a for a, b in zip(got, got[1:]))
    increments = [b - a for a, b in zip([s_i] + got, got)]
    assert all(b < a for a, b in zip(increments, increments[1:]))  # fast first, slow at the end


def test_equal_steps_and_step_ratio():
    assert schedule.equal_steps(0.6, 3) == pytest.approx([0.2, 0.4, 0.6])
    assert schedule.one_shot(0.5) == [0.5]
    # removing 50% of the remaining after 50% gives 75% of the original
    assert schedule.step_ratio(0.5, 0.75) == pytest.approx(0.5)
    assert schedule.step_ratio(0.5, 0.5) == 0.0
