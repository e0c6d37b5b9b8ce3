import onnx
import pytest
import torch

from torchslim.errors import ExportError
from torchslim.export import export_onnx, onnx_outputs, verify_onnx
from torchslim.measure.latency import ort_session
from torchslim.models import cnn_teacher


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_matches_pytorch_on_real_images(exporter, tmp_path):
    from torchslim.data import fashion_mnist

    data = fashion_mnist.load(eval_subset=256)
    torch.manual_seed(0)
    model = cnn_teacher().eval()
    path = export_onnx(model, tmp_path / "m.onnx", data.input, exporter=exporter)
    onnx.checker.check_model(str(path))
    session = ort_session(path, threads=2)
    images = data.test.tensors[0]
    assert len(images) == 256
    diff = verify_onnx(model, session, images, tolerance=1e-4)
    assert diff <= 1e-4
    # dynamic batch axis: other batch sizes run too
    assert onnx_outputs(session, images[:3].numpy()).shape == (3, 10)
    assert session.get_inputs()[0].name == "input"


def test_disagreement_is_an_error(tmp_path):
    from torchslim.data import fashion_mnist

    data = fashion_mnist.load(eval_subset=32)
    model = cnn_teacher().eval()
    path = export_onnx(model, tmp_path / "m.onnx", data.input, exporter="torchscript")
    with torch.no_grad():
        model.classifier[-1].bias += 1.0  # the artifact no longer matches the model
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        verify_onnx(model, ort_session(path), data.test.tensors[0])


def test_untraceable_model_names_the_cause(tmp_path):
    from torchslim.data.spec import InputSpec

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("custom op 'frobnicate' has no ONNX symbolic")

    with pytest.raises(ExportError) as info:
        export_onnx(Broken(), tmp_path / "b.onnx", InputSpec(shape=[None, 4]))
    assert "frobnicate" in str(info.value) and "dynamo" in str(info.value) and "torchscript" in str(info.value)
    assert not (tmp_path / "b.onnx").exists() and not (tmp_path / "b.onnx.tmp").exists()
