import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from torchslim.distill.distiller import Distiller, FeatureTerm, Indexed, teacher_cache
from torchslim.distill.hooks import capture
from torchslim.distill.losses import attention_transfer, hint_loss, kd_loss, soft_loss
from torchslim.distill.students import derive_depth, derive_width
from torchslim.errors import RecipeError, TorchslimError
from torchslim.models import cnn_student, cnn_teacher, mlp_student, mlp_teacher
from torchslim.pipeline import run
from torchslim.recipe import parse_recipe
from torchslim.train import TrainConfig, fit
from zoo import TinyTransformer


def test_kd_loss_matches_a_hand_computation():
    s = torch.tensor([[2.0, 0.5, -1.0]])
    t = torch.tensor([[1.0, 1.5, 0.0]])
    y = torch.tensor([1])
    T = 2.0

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    p_t, p_s = softmax(t.numpy()[0] / T), softmax(s.numpy()[0] / T)
    kl = float(np.sum(p_t * np.log(p_t / p_s))) * T * T
    ce = -math.log(softmax(s.numpy()[0])[1])
    total, parts = kd_loss(s, t, y, temperature=T, soft_weight=0.25, hard_weight=0.75)
    assert parts["soft"].item() == pytest.approx(kl, rel=1e-5)
    assert parts["hard"].item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx(0.25 * kl + 0.75 * ce, rel=1e-5)
    assert soft_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_losses_match_hand_computations():
    a, b = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert hint_loss(a, b).item() == pytest.approx(1.0)
    # attention transfer: map = normalise(mean_c |A|^2); identical spatial patterns give 0 whatever the width
    x = torch.rand(2, 8, 5, 5)
    assert attention_transfer(x[:, :1].repeat(1, 3, 1, 1), x[:, :1].repeat(1, 7, 1, 1)).item() == pytest.approx(
        0, abs=1e-6
    )
    s, t = torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)
    s[..., 0], t[..., 1] = 1.0, 1.0  # orthogonal unit maps: squared distance 2
    assert attention_transfer(s, t).item() == pytest.approx(2.0)


def test_hooks_capture_named_modules():
    torch.manual_seed(0)
    model = cnn_teacher().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), capture(model, ["features.2", "classifier.2"]) as got:
        model(x)
        direct = model.features[:3](x)
        assert torch.equal(got["features.2"], direct)
        assert got["classifier.2"].shape == (2, 512)
    with pytest.raises(TorchslimError, match="did you mean"):
        with capture(model, ["features.02x"]):
            pass


def test_hint_adapters_are_trained_then_removed(small_data):
    torch.manual_seed(0)
    teacher, student = cnn_teacher().eval(), cnn_student()
    keys = set(student.state_dict())
    d = Distiller(
        teacher,
        student,
        small_data.test.tensors[0][:2],
        features=[
            FeatureTerm("features.4", "features.6", "hint"),
            FeatureTerm("features.9", "features.13", "attention", 0.5),
        ],
    )
    adapter = student.torchslim_adapters["0"]
    assert isinstance(adapter, nn.Conv2d) and (adapter.in_channels, adapter.out_channels) == (32, 64)
    before = adapter.weight.detach().clone()
    result = fit(student, small_data.train, TrainConfig(epochs=1, lr=1e-3), loss_fn=d.loss, batch_size=128)
    assert not torch.equal(before, student.torchslim_adapters["0"].weight)
    assert {"loss_soft", "loss_hard", "loss_hint0", "loss_attention1"} <= result.history[0].keys()
    Distiller.finish(student)
    assert set(student.state_dict()) == keys


def test_cached_teacher_gives_the_same_weights(small_data, tmp_path):
    torch.manual_seed(0)
    teacher = mlp_teacher().eval()
    init = mlp_student().state_dict()
    runs = []
    for cached in (False, True):
        student = mlp_student()
        student.load_state_dict(init)
        logits = teacher_cache(teacher, small_data.train, tmp_path / "t.safetensors") if cached else None
        d = Distiller(teacher, student, small_data.test.tensors[0][:2], cached_logits=logits)
        data = Indexed(small_data.train) if cached else small_data.train
        fit(student, data, TrainConfig(epochs=2, lr=2e-3), loss_fn=d.loss, batch_size=64, seed=3)
        Distiller.finish(student)
        runs.append(student.state_dict())
    # GEMM kernels round differently for different batch shapes (~1e-7 in the logits), so the cached run
    # is the same training up to float rounding: every weight within 1e-4 of the live-teacher run
    # (a misaligned cache moves weights by ~1e-2)
    worst = max(float((runs[0][k] - runs[1][k]).abs().max()) for k in runs[0])
    print("max weight difference, cached vs live teacher:", worst)
    assert worst < 1e-4
    again = teacher_cache(teacher, small_data.train, tmp_path / "t.safetensors")  # read back, not recomputed
    assert torch.equal(again, load_file(str(tmp_path / "t.safetensors")).popitem()[1])


def test_students_derived_by_width_and_depth():
    x = torch.randn(2, 1, 28, 28)
    teacher = cnn_teacher().eval()
    slim = derive_width(teacher, x, 0.5)
    assert slim.features[0].out_channels == 32 and teacher.features[0].out_channels == 64
    tt = TinyTransformer().eval()
    shallow, kept = derive_depth(tt, "layers", 2)
    assert kept == [1] and len(shallow.layers) == 1 and len(tt.layers) == 2
    assert torch.equal(shallow.layers[0].ffn[0].weight, tt.layers[1].ffn[0].weight)
    assert shallow(x).shape == (2, 10)


def _recipe(tiny_recipe, distill):
    tiny_recipe["model"] = {"builtin": "cnn_teacher"}
    tiny_recipe["data"].update(train_subset=768, eval_subset=200)
    tiny_recipe["stages"] = [{"train": {"epochs": 1, "lr": 0.002}}, {"distill": distill}, {"export": {"format": "all"}}]
    return parse_recipe(tiny_recipe)


def test_distill_stage_reports_and_resumes(tmp_path, tiny_recipe):
    recipe = _recipe(tiny_recipe, {"student": {"builtin": "cnn_student"}, "train": {"epochs": 2, "lr": 0.003}})
    report = run(recipe, tmp_path / "a")
    d = report["stages"][2]
    assert d["comparison"]["teacher_params"] >= 5 * d["comparison"]["student_params"]
    assert d["metrics"]["params"] == d["comparison"]["student_params"] and d["teacher_cached"]
    assert report["summary"]["reference_stage"] == "train" and report["summary"]["param_ratio"] > 9
    html = (tmp_path / "a" / "report.html").read_text()
    assert "Teacher vs student" in html and "Distillation — stage 2" in html
    # stop after the distill stage; the resumed run rebuilds the student's architecture
    state_path = tmp_path / "a" / "state.json"
    state = json.loads(state_path.read_text())
    state.update(status="running", stages=state["stages"][:3])
    state_path.write_text(json.dumps(state))
    resumed = run(recipe, tmp_path / "a", resume=True)
    assert resumed["stages"][3]["metrics"]["params"] == d["comparison"]["student_params"]
    assert resumed["stages"][3]["metrics"]["accuracy"] == d["metrics"]["accuracy"]


def test_distill_config_errors(tiny_recipe):
    with pytest.raises(RecipeError, match="exactly one"):
        _recipe(tiny_recipe, {"student": {"builtin": "cnn_student", "derive": "width"}, "train": {}})
    with pytest.raises(RecipeError, match="needs 'blocks'"):
        _recipe(tiny_recipe, {"student": {"derive": "depth"}, "train": {}})
    with pytest.raises(RecipeError, match="all loss weights are zero"):
        _recipe(tiny_recipe, {"student": {"builtin": "cnn_student"}, "soft_weight": 0, "hard_weight": 0, "train": {}})
    with pytest.raises(RecipeError, match="alpha"):
        _recipe(tiny_recipe, {"student": {"builtin": "cnn_student"}, "alpha": 0.5, "train": {}})


def test_builtin_distill_recipe_is_valid():
    from torchslim.recipe import load_recipe

    recipe, _ = load_recipe("distill")
    assert [s.name for s in recipe.stages] == ["train", "distill", "export"]
    cfg = recipe.stages[1].config
    assert cfg.student.derive == "width" and cfg.student.ratio == 0.6
    assert cfg.soft_weight + cfg.hard_weight == pytest.approx(1.0)
