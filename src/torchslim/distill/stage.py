"""The `distill` recipe stage, one for every task: the task's distillation setup (`Task.distillation`,
a `torchslim.distill.setup.DistillSetup`) says the teacher, the student, the output term and the
feature terms by module path; this stage builds the loss from them (`DistillationLoss`: the output
term plus the weighted feature terms, read with forward hooks), trains the student on the one
training loop and returns the setup's result. Each task's settings keep their own keys, so the
stage is registered once per settings class."""

from __future__ import annotations

from torchslim.distill.distiller import DistillationLoss
from torchslim.distill.encoder import EncoderDistillation
from torchslim.distill.lm import LMDistillation
from torchslim.distill.logits import LogitDistillation
from torchslim.registry import register_alias, register_stage
from torchslim.results import StageResult


def distill(model, cfg, ctx) -> StageResult:
    """Train a student to match the teacher (its outputs, hidden states, attention); the student is the
    result."""
    setup = ctx.task.distillation(model, cfg, ctx)
    loss = DistillationLoss(setup.teacher, setup.output, setup.features, setup.student, setup.example)
    trained = None
    if not setup.resumed():
        trained = ctx.fit(
            setup.student,
            cfg.train,
            loss.loss,
            train_set=setup.train_set(),
            checkpoint_dir=ctx.stage_dir / setup.checkpoint,
            description=setup.description,
            epoch_setup=setup.epoch_setup,
            stop=setup.stop,
        )
    DistillationLoss.finish(setup.student)
    return setup.result(trained)


for _setup, _tasks, _needs in (
    (LogitDistillation, None, ("classifier",)),
    (EncoderDistillation, ("embedding",), ()),
    (LMDistillation, ("causal_lm",), ()),
):
    register_stage("distill", _setup.config, compresses=True, tasks=_tasks, needs=_needs, summary=_setup.summary)(
        distill
    )

register_alias(
    "encoder_distill",
    "distill",
    "'encoder_distill' is now 'distill' (on a task: embedding recipe it "
    "does the same); the old name goes in the next release.",
)
