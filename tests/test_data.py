import gzip

import numpy as np
import pytest
import torch

from torchslim.data import build_data, fashion_mnist
from torchslim.errors import DataError
from torchslim.recipe import DataSpec


def test_full_splits_are_deterministic_and_disjoint():
    a = fashion_mnist.load()
    b = fashion_mnist.load()
    assert (len(a.train), len(a.val), len(a.test)) == (55000, 5000, 10000)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert a.train.tensors[0].shape[1:] == (1, 28, 28) and a.train.tensors[0].dtype == torch.float32
    # normalised with the training statistics: mean ~0, std ~1 on the training split
    x = a.train.tensors[0]
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01
    # validation images are not among the first training images (disjoint split of the 60k)
    train_rows = {bytes(r.numpy()) for r in a.train.tensors[0][:2000].flatten(1)}
    assert not any(bytes(r.numpy()) in train_rows for r in a.val.tensors[0][:500].flatten(1))
    assert sorted(torch.bincount(a.test.tensors[1]).tolist()) == [1000] * 10


def test_subsets_take_first_n():
    full = fashion_mnist.load()
    small = fashion_mnist.load(train_subset=100, eval_subset=50)
    assert (len(small.train), len(small.val), len(small.test)) == (100, 50, 50)
    assert torch.equal(small.train.tensors[0], full.train.tensors[0][:100])
    assert torch.equal(small.test.tensors[1], full.test.tensors[1][:50])


def test_input_spec_reproduces_normalisation():
    bundle = fashion_mnist.load(eval_subset=10)
    raw = fashion_mnist.load_arrays()["test_images"][:10].astype(np.float32)
    spec = bundle.input
    fed = (raw * spec.pixel_scale - spec.mean[0]) / spec.std[0]
    assert np.abs(fed - bundle.test.tensors[0][:, 0].numpy()).max() < 1e-5
    assert spec.shape == [None, 1, 28, 28]


def test_missing_files_name_package_path_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_DATA", str(tmp_path))
    with pytest.raises(DataError) as info:
        fashion_mnist.load()
    msg = str(info.value)
    assert "dataset-fashion-mnist" in msg and "TORCHSLIM_DATA" in msg and str(tmp_path) in msg


def _copy_dataset(tmp_path):
    for name in fashion_mnist.FILES.values():
        (tmp_path / name).write_bytes((fashion_mnist.DEFAULT_DIR / name).read_bytes())


@pytest.mark.parametrize("damage", ["truncated_gzip", "bad_magic", "short_payload"])
def test_corrupt_files_are_clear_errors(tmp_path, damage):
    _copy_dataset(tmp_path)
    target = tmp_path / fashion_mnist.FILES["test_labels"]
    raw = gzip.decompress(target.read_bytes())
    if damage == "truncated_gzip":
        target.write_bytes(target.read_bytes()[:200])
    elif damage == "bad_magic":
        target.write_bytes(gzip.compress(b"\x12\x34" + raw[2:]))
    else:
        target.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError) as info:
        fashion_mnist.load(root=tmp_path)
    assert str(target) in str(info.value) and "dataset-fashion-mnist" in str(info.value)


def test_user_data_entrypoint(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def build(n=40):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    make = lambda k: TensorDataset(torch.randn(k, 3, generator=g), torch.randint(0, 2, (k,), generator=g))\n"
        "    return {'train': make(n), 'test': make(10), 'num_classes': 2}\n"
    )
    spec = DataSpec(entrypoint="mydata:build", val_size=8, kwargs={"n": 40})
    bundle = build_data(spec, search_dir=tmp_path)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (32, 8, 10)
    assert bundle.input.shape == [None, 3] and bundle.num_classes == 2
    bad = DataSpec(entrypoint="mydata:nothing_here")
    with pytest.raises(Exception) as info:
        build_data(bad, search_dir=tmp_path)
    assert "nothing_here" in str(info.value)
