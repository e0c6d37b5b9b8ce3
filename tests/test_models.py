import pytest
import torch

from torchslim.errors import TorchslimError
from torchslim.models import MODELS, cnn_student, cnn_teacher, load_weights, mlp_student, mlp_teacher, save_weights


def linear(i, o):
    return i * o + o


def conv(i, o, bias=True):
    return i * o * 9 + (o if bias else 0)


def test_parameter_counts_match_the_seed_architectures():
    def n(m):
        return sum(p.numel() for p in m.parameters())

    assert n(mlp_teacher()) == linear(784, 512) + linear(512, 256) + linear(256, 128) + linear(128, 10)
    assert n(mlp_student()) == linear(784, 64) + linear(64, 32) + linear(32, 10)
    widths = [(1, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
    teacher_convs = sum(conv(i, o, bias=False) + 2 * o for i, o in widths)  # conv + batch-norm affine
    assert n(cnn_teacher()) == teacher_convs + linear(256, 512) + linear(512, 256) + linear(256, 10)
    student_convs = sum(conv(i, o) for i, o in [(1, 32), (32, 32), (32, 64), (64, 64), (64, 128)])
    assert n(cnn_student()) == student_convs + linear(128, 64) + linear(64, 10)
    assert n(cnn_teacher()) >= 5 * n(cnn_student())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_take_fashion_mnist_images(name):
    model = MODELS[name]().eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_safetensors_and_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    src, dst = cnn_student(), cnn_student()
    save_weights(src, tmp_path / "w.safetensors")
    load_weights(dst, tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    other = load_weights(cnn_student(), tmp_path / "w.pt")
    assert torch.equal(other.features[0].weight, src.features[0].weight)


def test_wrong_checkpoint_shape_is_a_clear_error(tmp_path):
    save_weights(mlp_student(), tmp_path / "w.safetensors")
    with pytest.raises(TorchslimError, match="does not fit the model"):
        load_weights(mlp_teacher(), tmp_path / "w.safetensors")


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(TorchslimError, match="refused"):
        load_weights(mlp_student(), tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
