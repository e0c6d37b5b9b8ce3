"""The cache of trained weights: a second run of the same training reuses the weights, and everything after
it (weights, random numbers, the next stages) is exactly what an uncached run gives; any change to what
decides the weights is a new entry."""

import json

import torch
from safetensors.torch import load_file

from torchslim import cache
from torchslim.models import mlp_student
from torchslim.pipeline import run
from torchslim.recipe import parse_recipe


def _recipe(tiny_recipe, **train):
    tiny_recipe["stages"] = [
        {"train": {"epochs": 1, "lr": 0.003, "cache": True, **train}},
        {"prune": {"method": "structured", "ratio": 0.5, "finetune": {"epochs": 1, "lr": 0.001}}},
    ]
    return parse_recipe(tiny_recipe, "test")


def _weights(run_dir, stage):
    return load_file(str(next((run_dir / "stages").glob(f"*-{stage}")) / "model.safetensors"))


def test_a_second_run_reuses_the_training_and_ends_identical(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    first = run(_recipe(tiny_recipe), tmp_path / "a")
    second = run(_recipe(tiny_recipe), tmp_path / "b")
    assert "cached" not in first["stages"][1]
    reused = second["stages"][1]["cached"]
    assert reused["path"].startswith(str(tmp_path / "cache")) and reused["trained_seconds"] > 0
    assert second["stages"][1]["history"] == first["stages"][1]["history"]
    for stage in ("train", "prune"):  # the prune stage fine-tunes with random batches: the RNG state was restored
        a, b = _weights(tmp_path / "a", stage), _weights(tmp_path / "b", stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second["stages"][-1]["metrics"]["accuracy"] == first["stages"][-1]["metrics"]["accuracy"]
    # a run without the cache trains and ends with the same weights too
    tiny_recipe["stages"] = [{"train": {"epochs": 1, "lr": 0.003}}, first["recipe"]["stages"][1]]
    plain = run(parse_recipe(tiny_recipe, "test"), tmp_path / "c")
    assert "cached" not in plain["stages"][1]
    c = _weights(tmp_path / "c", "prune")
    assert all(torch.equal(c[k], _weights(tmp_path / "a", "prune")[k]) for k in c)


def test_the_key_follows_what_decides_the_weights():
    torch.manual_seed(0)
    model = mlp_student()
    settings = {"train": {"epochs": 1, "lr": 0.003}, "data": {"batch_size": 64}, "seed": 0}
    key = cache.training_key(model, settings)
    assert cache.training_key(model, json.loads(json.dumps(settings))) == key
    assert cache.training_key(model, {**settings, "seed": 1}) != key
    assert cache.training_key(model, {**settings, "train": {"epochs": 1, "lr": 0.002}}) != key
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-6
    assert cache.training_key(model, settings) != key


def test_a_damaged_entry_is_a_miss_and_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path))
    model = mlp_student()
    entry = cache.store("k", model, {"history": []})
    assert cache.lookup("k", mlp_student()) is not None
    (entry / cache.WEIGHTS).write_bytes(b"not safetensors")
    assert cache.lookup("k", mlp_student()) is None and not entry.exists()
