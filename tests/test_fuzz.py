"""Property-based tests: generated recipes and corrupted data files give either a valid recipe / a
clean load, or a torchslim error with a message — never another exception. Bounded examples."""

import gzip

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchslim.data import fashion_mnist
from torchslim.errors import TorchslimError
from torchslim.recipe import load_recipe, parse_recipe

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
stage_names = st.sampled_from(
    [
        "train",
        "prune",
        "quantize",
        "distill",
        "lowrank",
        "export",
        "auto",
        "encoder_quantize",
        "encoder_distill",
        "trian",
        "",
    ]
)
stage_keys = st.sampled_from(
    [
        "epochs",
        "lr",
        "ratio",
        "method",
        "temperature",
        "soft_weight",
        "budget",
        "format",
        "target",
        "steps",
        "student",
        "observer",
        "x",
    ]
)
stages = st.lists(
    st.dictionaries(stage_names, st.dictionaries(stage_keys, values, max_size=3), min_size=1, max_size=2), max_size=3
)
recipes = st.fixed_dictionaries(
    {
        "name": st.one_of(st.just("fuzz"), st.text(max_size=6)),
        "model": st.one_of(
            st.just({"builtin": "mlp_student"}),
            st.dictionaries(
                st.sampled_from(["builtin", "entrypoint", "hf", "checkpoint", "kwargs"]), values, max_size=2
            ),
        ),
        "data": st.one_of(
            st.just({"builtin": "fashion_mnist"}),
            st.dictionaries(
                st.sampled_from(["builtin", "batch_size", "train_subset", "sources", "evaluation"]), values, max_size=3
            ),
        ),
        "stages": stages,
    },
    optional={
        "task": st.sampled_from(["classification", "embedding", "detection"]),
        "measure": st.dictionaries(
            st.sampled_from(["runtime", "threads", "batch_size", "repeats"]), values, max_size=2
        ),
        "preset": st.one_of(st.sampled_from(["mobile", "edge", "cloud", "realtime"]), st.text(max_size=5)),
        "seed": values,
    },
)


@SETTINGS
@given(recipes)
def test_generated_recipes_validate_or_fail_cleanly(recipe):
    try:
        parsed = parse_recipe(recipe)
    except TorchslimError as exc:
        assert str(exc).strip()
        return
    assert parsed.to_dict()["stages"] is not None  # a valid one round-trips to plain data


@SETTINGS
@given(st.text(max_size=200))
def test_arbitrary_yaml_text_loads_or_fails_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "r.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except TorchslimError as exc:
        assert str(exc).strip()


@pytest.fixture(scope="module")
def pristine():
    return {
        k: (fashion_mnist.DEFAULT_DIR / name).read_bytes()
        for k, name in fashion_mnist.FILES.items()
        if k.startswith("test")
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["test_images", "test_labels"]),
    how=st.sampled_from(["truncate_gzip", "truncate_payload", "flip_bytes", "replace"]),
    where=st.integers(0, 10**6),
    junk=st.binary(min_size=1, max_size=64),
)
def test_corrupted_data_files_load_or_fail_cleanly(tmp_path_factory, pristine, which, how, where, junk):
    root = tmp_path_factory.mktemp("data")
    for key, name in fashion_mnist.FILES.items():
        if key.startswith("test"):
            (root / name).write_bytes(pristine[key])
        else:  # the training files are not read by this check; point them at small valid copies
            (root / name).write_bytes(pristine[key.replace("train", "test")])
    target = root / fashion_mnist.FILES[which]
    raw = gzip.decompress(pristine[which])
    if how == "truncate_gzip":
        target.write_bytes(pristine[which][: where % len(pristine[which])])
    elif how == "truncate_payload":
        target.write_bytes(gzip.compress(raw[: where % len(raw)]))
    elif how == "flip_bytes":
        i = where % max(len(raw) - len(junk), 1)
        target.write_bytes(gzip.compress(raw[:i] + junk + raw[i + len(junk) :]))
    else:
        target.write_bytes(junk)
    try:
        fashion_mnist.load(root=root)
    except TorchslimError as exc:
        assert str(target) in str(exc) or "Fashion-MNIST" in str(exc)
