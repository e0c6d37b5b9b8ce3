import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.errors import TorchslimError
from torchslim.models import mlp_student
from torchslim.train import TrainConfig, activation_checkpointing, cross_entropy_loss, evaluate_accuracy, fit


def _fit(model, data, **overrides):
    cfg = TrainConfig(**{"epochs": 2, "lr": 3e-3, **overrides})
    return fit(
        model,
        data.train,
        cfg,
        loss_fn=cross_entropy_loss(),
        batch_size=64,
        validate=lambda m: evaluate_accuracy(m, data.val),
        seed=0,
    )


def test_training_learns_real_data(small_data):
    torch.manual_seed(0)
    model = mlp_student()
    before = evaluate_accuracy(model, small_data.test)
    result = _fit(model, small_data)
    after = evaluate_accuracy(model, small_data.test)
    assert before < 0.3 and after > 0.72, (before, after)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[1]["loss"] < result.history[0]["loss"]
    assert {"loss", "loss_ce", "lr", "val_metric"} <= result.history[0].keys()
    assert result.history[1]["lr"] < result.history[0]["lr"]  # cosine decays


def test_resume_gives_the_same_weights(small_data, tmp_path):
    torch.manual_seed(1)
    init = mlp_student().state_dict()
    cfg = TrainConfig(epochs=3, lr=3e-3)
    kwargs = dict(
        loss_fn=cross_entropy_loss(), batch_size=64, seed=5, validate=lambda m: evaluate_accuracy(m, small_data.val)
    )

    full = mlp_student()
    full.load_state_dict(init)
    fit(full, small_data.train, cfg, checkpoint_dir=tmp_path / "a", **kwargs)

    def stop_after_first(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    part = mlp_student()
    part.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        fit(part, small_data.train, cfg, checkpoint_dir=tmp_path / "b", on_epoch_end=stop_after_first, **kwargs)
    resumed = mlp_student()  # a fresh process would rebuild the model from scratch
    result = fit(resumed, small_data.train, cfg, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    assert len(result.history) == 3
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_gradient_accumulation_matches_a_bigger_batch():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,)))  # shapes only, no claim
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    common = dict(epochs=1, lr=0.1, optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant")
    fit(a, data, TrainConfig(**common), loss_fn=cross_entropy_loss(), batch_size=64, seed=0)
    fit(b, data, TrainConfig(**common, grad_accum_steps=4), loss_fn=cross_entropy_loss(), batch_size=16, seed=0)
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


def test_activation_checkpointing_keeps_gradients_and_state_keys():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(6, 4)
    model(x).square().sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    keys = list(model.state_dict())
    with activation_checkpointing(model, True):
        model(x).square().sum().backward()
        assert list(model.state_dict()) == keys
    for ref, p in zip(reference, model.parameters()):
        assert torch.allclose(ref, p.grad, atol=1e-6)
    with pytest.raises(TorchslimError, match="no module named"):
        with activation_checkpointing(model, ["nope"]):
            pass


def test_bf16_autocast_trains(small_data):
    torch.manual_seed(0)
    model = mlp_student()
    _fit(model, small_data, precision="bf16", epochs=1)
    assert evaluate_accuracy(model, small_data.test) > 0.65


def test_early_stopping_and_restore_best(small_data):
    torch.manual_seed(0)
    model = mlp_student()
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.9])
    snapshots = []

    def validate(m):
        snapshots.append(m.network[1].weight.detach().clone())
        return next(scores)

    cfg = TrainConfig(epochs=5, lr=1e-3, early_stopping={"patience": 2})
    result = fit(model, small_data.train, cfg, loss_fn=cross_entropy_loss(), batch_size=256, validate=validate, seed=0)
    assert result.stopped_early and len(result.history) == 4 and result.best_epoch == 2
    assert torch.equal(model.network[1].weight, snapshots[1])


def test_nan_loss_stops_with_a_message(small_data):
    def bad_loss(model, batch):
        loss = model(batch[0]).sum() * float("nan")
        return loss, {}

    with pytest.raises(TorchslimError, match="loss became nan at step 1"):
        fit(mlp_student(), small_data.train, TrainConfig(), loss_fn=bad_loss, batch_size=64)


def test_grad_clip_bounds_the_update():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 5) * 100, torch.randint(0, 3, (32,)))
    model = nn.Linear(5, 3)
    before = model.weight.detach().clone()
    cfg = TrainConfig(
        epochs=1, lr=1.0, optimizer="sgd", momentum=0, weight_decay=0, schedule="constant", grad_clip=0.01
    )
    fit(model, data, cfg, loss_fn=cross_entropy_loss(), batch_size=32)
    assert (model.weight - before).norm() <= 0.01 + 1e-6
