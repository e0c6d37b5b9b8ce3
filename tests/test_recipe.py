import subprocess
import sys

import pytest
import yaml

from torchslim.errors import RecipeError
from torchslim.recipe import builtin_recipes, load_recipe, parse_recipe, presets


def test_builtin_recipes_validate_and_round_trip():
    names = builtin_recipes()
    assert {"default", "smoke"} <= set(names)
    for name in names:
        recipe, _ = load_recipe(name)
        again = parse_recipe(recipe.to_dict())
        assert again.to_dict() == recipe.to_dict()
        raw = yaml.safe_load(names[name].read_text())
        expected = [next(iter(s)) for s in raw["stages"]]
        if raw.get("preset"):  # a preset's stages follow the recipe's own
            expected += [next(iter(s)) for s in yaml.safe_load(presets()[raw["preset"]].read_text())["stages"]]
        assert [s.name for s in recipe.stages] == expected


def test_defaults_are_filled_in(tiny_recipe):
    del tiny_recipe["measure"]
    recipe = parse_recipe(tiny_recipe)
    assert recipe.measure.batch_size == 32 and recipe.measure.threads == 2
    assert recipe.stages[0].config.optimizer == "adamw" and recipe.stages[0].config.epochs == 2


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda r: r["stages"][0]["train"].update(lrr=0.1),
            ["stages[0].train.lrr", "unknown key", "Did you mean 'lr'"],
        ),
        (lambda r: r["stages"][0]["train"].update(lr=-0.1), ["stages[0].train.lr", "greater than 0", "-0.1"]),
        (
            lambda r: r["stages"].append({"prune_everything": {}}),
            ["stages[2]", "unknown stage 'prune_everything'", "train"],
        ),
        (lambda r: r["data"].update(batchsize=3), ["data.batchsize", "Did you mean 'batch_size'", "eval_batch_size"]),
        (lambda r: r["measure"].update(runtime="tensorrt"), ["measure.runtime", "'onnxruntime' or 'pytorch'"]),
        (lambda r: r["data"].update(batch_size="big"), ["data.batch_size", "valid integer"]),
        (lambda r: r.update(model={"builtin": "resnet9000"}), ["model", "resnet9000", "cnn_teacher"]),
        (lambda r: r.update(model={"builtin": "cnn_teacher", "entrypoint": "a:b"}), ["exactly one"]),
        (lambda r: r.update(stages="train"), ["stages", "list"]),
        (lambda r: r["stages"][0]["train"].update(precision="fp8"), ["precision", "'fp32', 'bf16', 'fp16' or 'auto'"]),
    ],
)
def test_bad_recipes_name_the_problem(tiny_recipe, mutate, expected):
    mutate(tiny_recipe)
    with pytest.raises(RecipeError) as info:
        parse_recipe(tiny_recipe)
    for part in expected:
        assert part in str(info.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [train: {epochs: 1}\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="Built-in recipes: .*default"):
        load_recipe("no-such-recipe")


def _cli(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "torchslim", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize("case", ["misspelled_key", "negative_lr", "unknown_stage", "missing_data"])
def test_cli_bad_input_exits_nonzero_with_a_message(case, tiny_recipe, tmp_path, cli_env):
    if case == "misspelled_key":
        tiny_recipe["stages"][0]["train"]["epohcs"] = 2
        needle = "epohcs"
    elif case == "negative_lr":
        tiny_recipe["stages"][0]["train"]["lr"] = -1
        needle = "stages[0].train.lr"
    elif case == "unknown_stage":
        tiny_recipe["stages"].insert(0, {"distil": {}})
        needle = "unknown stage 'distil'"
    else:
        cli_env["TORCHSLIM_DATA"] = str(tmp_path / "empty")
        needle = "dataset-fashion-mnist"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    result = _cli(["run", str(path), "--out", str(tmp_path / "run")], cli_env, tmp_path)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) <= 8  # one paragraph, not a dump


def test_cli_recipes_lists_names_first(cli_env, tmp_path):
    result = _cli(["recipes"], cli_env, tmp_path)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    names = sorted(builtin_recipes())
    assert lines[: len(names)] == names
    assert any(line.startswith("smoke: ") for line in lines[len(names) :])


def test_cli_help_everywhere(cli_env, tmp_path):
    for args in (["--help"], ["run", "--help"], ["analyze", "--help"], ["recipes", "--help"]):
        result = _cli(args, cli_env, tmp_path)
        assert result.returncode == 0 and "Usage" in result.stdout


def test_presets_expand_into_stages_and_measure_settings():
    assert set(presets()) == {"mobile", "edge", "cloud", "realtime"}
    for name in presets():
        recipe, _ = load_recipe(name)
        assert [s.name for s in recipe.stages][0] == "train" and recipe.stages[-1].name == "export"
        assert "quantize" in [s.name for s in recipe.stages]
    assert load_recipe("realtime")[0].measure.batch_size == 1 and load_recipe("realtime")[0].measure.threads == 1
    assert load_recipe("cloud")[0].measure.batch_size == 256
    own = {
        "name": "mine",
        "model": {"builtin": "mlp_student"},
        "data": {"builtin": "fashion_mnist"},
        "preset": "edge",
        "measure": {"batch_size": 4},
    }
    parsed = parse_recipe(own)
    assert [s.name for s in parsed.stages] == ["prune", "quantize", "export"]
    assert parsed.measure.batch_size == 4 and parsed.measure.repeats == 100  # the recipe's own value wins
    assert [s.name for s in parse_recipe(parsed.to_dict()).stages] == ["prune", "quantize", "export"]
    with pytest.raises(RecipeError, match="unknown preset 'mobil'. Did you mean 'mobile'"):
        parse_recipe({**own, "preset": "mobil"})


@pytest.mark.parametrize(
    "stages, later, lowering",
    [
        ([{"train": {"epochs": 1}}, {"quantize": {}}, {"lowrank": {"rank_ratio": 0.5}}], "lowrank", "quantize"),
        ([{"quantize": {}}, {"prune": {"ratio": 0.5}}], "prune", "quantize"),
        ([{"quantize": {}}, {"train": {"epochs": 1}}], "train", "quantize"),
        ([{"quantize": {}}, {"quantize": {"method": "dynamic"}}], "quantize", "quantize"),
        (
            [{"auto": {}}, {"distill": {"student": {"builtin": "mlp_student"}, "train": {"epochs": 1}}}],
            "distill",
            "auto",
        ),
    ],
)
def test_a_stage_that_changes_the_model_after_lowering_is_refused(tiny_recipe, stages, later, lowering):
    tiny_recipe["stages"] = stages + [{"export": {}}]
    with pytest.raises(RecipeError) as info:
        parse_recipe(tiny_recipe)
    message = str(info.value)
    assert f"'{later}' changes the model" in message and f"'{lowering}' already lowered it" in message
    assert f"Put '{later}' before '{lowering}'" in message and "(got {" not in message


def test_embedding_distill_after_quantize_is_refused_and_old_names_still_work(capsys):
    recipe = yaml.safe_load(builtin_recipes()["minilm-int8"].read_text())
    recipe["stages"] = [{"encoder_quantize": {}}, {"encoder_distill": {"keep_every": 2}}]
    with pytest.raises(RecipeError, match="'distill' changes the model, but stages.0. 'quantize'"):
        parse_recipe(recipe)
    said = capsys.readouterr().err
    assert "'encoder_quantize' is now 'quantize'" in said and "'encoder_distill' is now 'distill'" in said
    recipe["stages"] = [{"encoder_quantize": {"target": 0.98}}]  # the old name gets the embedding quantizer
    parsed = parse_recipe(recipe)
    assert parsed.stages[0].name == "quantize" and parsed.stages[0].config.target == 0.98


def test_export_after_lowering_is_allowed_and_every_preset_lowers_last():
    for name in [*builtin_recipes(), *presets()]:
        load_recipe(name)  # every built-in recipe and preset passes the lowering-order check
    own = {
        "name": "mine",
        "model": {"builtin": "mlp_student"},
        "data": {"builtin": "fashion_mnist"},
        "stages": [{"quantize": {}}],
        "preset": "edge",
    }
    with pytest.raises(RecipeError, match="'prune' changes the model, but stages.0. 'quantize'"):
        parse_recipe(own)  # the preset's prune would follow the recipe's own quantize


@pytest.mark.parametrize(
    "where, config, message",
    [
        ("quantize", {"method": "static", "bits": 8}, "'bits' applies to method weight_only, not method 'static'"),
        (
            "quantize",
            {"method": "dynamic", "observer": "mse"},
            "'observer' applies to method static or qat, not method 'dynamic'",
        ),
        ("quantize", {"method": "weight_only", "finetune": {"epochs": 1}}, "'finetune' applies to method qat"),
        (
            "prune",
            {"method": "magnitude", "sparsity": 0.5, "ratio": 0.3},
            "'ratio' applies to method structured or blocks, not method 'magnitude'",
        ),
        (
            "prune",
            {"method": "structured", "ratio": 0.3, "n": 3},
            "'n' applies to method nm or wanda or sparsegpt, not method 'structured'",
        ),
        (
            "data",
            {"builtin": "fashion_mnist", "sources": ["fortunes"]},
            "'sources' applies to builtin text, not builtin 'fashion_mnist'",
        ),
        ("data", {"builtin": "text", "val_size": 10}, "'val_size' applies to builtin fashion_mnist or entrypoint"),
    ],
)
def test_a_key_of_another_method_is_an_error_naming_the_methods_that_take_it(where, config, message):
    recipe = {"name": "x", "model": {"builtin": "mlp_student"}, "data": {"builtin": "fashion_mnist"}}
    if where == "data":
        recipe["data"] = config
    else:
        recipe["stages"] = [{where: config}]
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        parse_recipe(recipe)


def test_ignore_is_one_name_for_layers_left_alone_with_exclude_accepted():
    from torchslim.paths import matches

    recipe = {
        "name": "x",
        "model": {"builtin": "mlp_student"},
        "data": {"builtin": "fashion_mnist"},
        "stages": [{"quantize": {"exclude": ["fc1"]}}, {"export": {}}],
    }
    assert parse_recipe(recipe).stages[0].config.ignore == ["fc1"]
    recipe["stages"] = [
        {"prune": {"ratio": 0.5, "ignore": ["head*"]}},
        {"lowrank": {"energy": 0.9, "ignore": ["features.0"]}},
    ]
    parsed = parse_recipe(recipe)
    assert parsed.stages[0].config.ignore == ["head*"] and parsed.stages[1].config.ignore == ["features.0"]
    assert matches("features.0.conv", ["features.0"]) and not matches("features.01", ["features.0"])
    assert matches("head.fc", ["head*"]) and matches("a.attention.b", ["*.attention.*"]) and not matches("x", [])
