"""A causal language model served from ONNX Runtime with a key/value cache, and generation over it.

The exported graph (`export_decoder`) takes `input_ids` (batch, sequence), `attention_mask`
(batch, past + sequence) and, per decoder layer, `past_key_values.N.key` / `.value`
(batch, kv heads, past_sequence, head size); it returns `logits` (batch, sequence, vocabulary) and
`present.N.key` / `.value`, the cache with this call's tokens appended. Every axis named above is
dynamic. The prompt is fed with a cache of length 0 (one graph for prompt and decoding); positions
come from the attention mask (cumulative sum), so left-padded batches are right too.

`complete_feed` adds the empty (or zero-filled) cache to a feed that names only the ids and the mask,
which is how the pipeline measures perplexity on the same artifact that generates.
`Generator` runs greedy or sampled decoding and times prefill and decoding."""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.errors import ExportError
from torchslim.export.attention import SplitCache, exporting_attention, onnx_translations, split_cache
from torchslim.export.common import PAST_AXIS, complete_feed, no_fused_encoder, quiet
from torchslim.io import replacing
from torchslim.log import warn

ATTENTION_KEY = "torchslim.attention"  # the graph's metadata: which attention form it was exported with


def past_name(layer: int, part: str) -> str:
    return f"past_key_values.{layer}.{part}"


def present_name(layer: int, part: str) -> str:
    return f"present.{layer}.{part}"


def _cache_layers(cache) -> list:
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


class CachedDecoder(nn.Module):
    """`(input_ids, attention_mask, past) -> (logits, *present)` for a Hugging Face causal LM; `past`
    is the flat tuple (key 0, value 0, key 1, value 1, ...). `fused`: the cache split into past and new
    for `export.attention.fused_attention`, whose kernel returns the present cache."""

    def __init__(self, lm: nn.Module, fused: bool = False):
        super().__init__()
        self.lm, self.fused = lm, fused

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...]):
        from transformers import DynamicCache

        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        cache = (_split_cache_class() if self.fused else DynamicCache)(ddp_cache_data=pairs)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        with split_cache(cache) if self.fused else nullcontext():
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        if self.fused:
            if sorted(cache.presents) != list(range(len(pairs))):
                raise ExportError(
                    f"{type(self.lm).__name__}: the fused attention saw layers {sorted(cache.presents)} of "
                    f"{len(pairs)} cached ones."
                )
            layers = [cache.presents[i] for i in range(len(pairs))]
        else:
            layers = [(layer.keys, layer.values) for layer in _cache_layers(out.past_key_values)]
        return (out.logits, *[t for pair in layers for t in pair])


@functools.cache
def _split_cache_class():
    """transformers' DynamicCache with SplitCache's update (transformers is imported only when used)."""
    from transformers import DynamicCache

    return type("SplitDynamicCache", (SplitCache, DynamicCache), {})


def cache_layout(lm: nn.Module) -> list[tuple[int, int]]:
    """(kv heads, head size) per cached layer, read from a two-token run (a pruned model's own widths,
    whatever its config says)."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    if out.past_key_values is None:
        raise ExportError(
            f"{type(lm).__name__} returned no key/value cache with use_cache=True; it cannot be served with a cache."
        )
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in _cache_layers(out.past_key_values)]


def _example(layout, batch: int, sequence: int, past: int):
    ids = torch.randint(0, 8, (batch, sequence))
    mask = torch.ones(batch, past + sequence, dtype=torch.long)
    cache = tuple(torch.randn(batch, heads, past, size) * 0.1 for heads, size in layout for _ in range(2))
    return ids, mask, cache


def export_decoder(lm: nn.Module, path: Path, opset: int = 18, plain: bool = False, fused: bool = False) -> Path:
    """Write `lm` with its key/value cache to `path` (atomically) with torch.export's ONNX exporter, and
    every `x · (1 / sqrt(v))` written `x / sqrt(v)`, the form ONNX Runtime fuses into one
    SimplifiedLayerNormalization kernel per RMS norm. Attention:

    - grouped (the default): `export.attention.grouped_attention` (the cache read in place, every shape);
    - `fused`: one ONNX Runtime GroupQueryAttention kernel per layer (`export.attention.fused_attention`:
      the cache appended and attended in one node), checked against PyTorch, falling back to grouped
      with a warning where the model cannot take it; it serves every shape but several multi-token
      sequences onto a non-empty cache. Measured on SmolLM2-135M int4 (`bench/llm_export.py`, AMD EPYC
      2 threads) it was no faster than grouped (decode after 1,024 tokens slower), hence not the default;
    - `plain`: the model's own attention, graph as exported (the comparison in `bench/llm_export.py`).

    The form is in the graph's metadata (`ATTENTION_KEY`). A model of the same structure as the last
    one exported (class, config, modules, parameter shapes: a healed or smoothed model after the pruned
    one it came from) reuses that graph with its own weights written in, checked against PyTorch on a
    short input; tracing a decoder takes tens of seconds to minutes, the check a fraction of one."""
    import onnx

    lm = lm.eval()
    forms = ["plain"] if plain else ["fused", "grouped"] if fused else ["grouped"]
    for form in forms:
        why = _not_fused(lm) if form == "fused" else None
        if why is None:
            try:
                proto = _graph(lm, form, opset)
            except ExportError as exc:
                if form == forms[-1]:
                    raise
                why = str(exc)
            else:
                if form != "fused" or _agrees(proto, lm):
                    break
                why = f"{type(lm).__name__}'s graph with ONNX Runtime's fused attention kernel does not match PyTorch"
        warn(f"export: {why}; the decoder is exported with the grouped attention form instead.")
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, ATTENTION_KEY: form})
    path = Path(path)
    with replacing(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def _not_fused(lm: nn.Module) -> str | None:
    """Why `lm` cannot take the fused attention kernel (found by one short eager run with the kernel's
    PyTorch twin, compared with the model's own attention), or None: no trace is spent on a model
    that cannot take it."""
    ids, mask, cache = _probe(lm)
    with torch.no_grad():
        with exporting_attention(lm, fused=True) as switched:
            if not switched:
                return f"{type(lm).__name__}'s attention does not go through Hugging Face's attention interface"
            try:
                got = CachedDecoder(lm, fused=True)(ids, mask, cache)
            except ExportError as exc:
                return str(exc)
        want = CachedDecoder(lm)(ids, mask, cache)
    if not _close([g.float().numpy() for g in got], [w.float().numpy() for w in want]):
        return f"{type(lm).__name__}'s attention computes something the fused kernel does not (outputs differ)"
    return None


def _probe(lm: nn.Module):
    """The short check input: 3 new tokens onto a 2-token cache, batch 1, the same every time."""
    torch.manual_seed(0)
    return _example(cache_layout(lm), 1, 3, 2)


def _close(got: list, want: list) -> bool:
    """Every output of the same shape and within 1e-3 of the reference's scale."""
    return len(got) == len(want) and all(
        g.shape == w.shape and np.abs(g - w).max() <= 1e-3 * max(1.0, np.abs(w).max()) for g, w in zip(got, want)
    )


def attention_form(graph_model) -> str | None:
    """The attention form a decoder graph (an onnx.ModelProto) was exported with, if it says."""
    return next((p.value for p in graph_model.metadata_props if p.key == ATTENTION_KEY), None)


def _graph(lm: nn.Module, form: str, opset: int):
    """The ONNX graph of `lm` in attention `form`, from the last structure's template where it applies."""
    key = _structure(lm, form, opset)
    if _LAST.get("key") != key:
        _LAST.clear()
        _LAST.update(key=key, template=_template(lm, form, opset))
    if _LAST["template"] is not None:
        proto = _filled(_LAST["template"], lm)
        if _agrees(proto, lm):
            return proto
        _LAST["template"] = None  # this structure's graph depends on its values: trace each
    return _trace(lm, form, opset)


_LAST: dict = {}  # the structure last exported and its graph (weights left out), or None: trace every time


def _structure(lm: nn.Module, form: str, opset: int) -> tuple:
    """What the traced graph depends on besides the weights' values. A model with hooks or a forward
    of its own on some module computes what its code says: never reused (a unique key)."""
    if any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in lm.modules()):
        return (object(),)
    config = getattr(lm, "config", None)
    ties: dict[int, list[str]] = {}
    for name, param in lm.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    return (
        type(lm).__qualname__,
        form,
        opset,
        config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config),
        tuple((n, type(m).__qualname__) for n, m in lm.named_modules()),
        tuple((n, tuple(t.shape), str(t.dtype)) for n, t in lm.state_dict(keep_vars=True).items()),
        tuple(tuple(names) for names in ties.values()),
    )


def _trace(lm: nn.Module, form: str, opset: int):
    """The ONNX graph of `lm` with its cache (an onnx.ModelProto), attention in `form`."""
    plain, fused = form == "plain", form == "fused"

    layout = cache_layout(lm)
    names = ["input_ids", "attention_mask"] + [past_name(i, p) for i in range(len(layout)) for p in ("key", "value")]
    outputs = ["logits"] + [present_name(i, p) for i in range(len(layout)) for p in ("key", "value")]
    big = 1 << 16
    batch = torch.export.Dim("batch", min=1, max=big)
    sequence = torch.export.Dim("sequence", min=1, max=big)
    past = torch.export.Dim(PAST_AXIS, min=1, max=big)
    total = torch.export.Dim("total_sequence", min=2, max=2 * big)
    shapes = ({0: batch, 1: sequence}, {0: batch, 1: total}, tuple({0: batch, 2: past} for _ in range(2 * len(layout))))
    try:
        with (
            quiet(),
            torch.no_grad(),
            no_fused_encoder(),
            nullcontext(False) if plain else exporting_attention(lm, fused) as switched,
        ):
            if fused and not switched:
                raise ExportError(f"{type(lm).__name__}'s attention does not go through Hugging Face's interface.")
            program = torch.onnx.export(
                CachedDecoder(lm, fused),
                _example(layout, 2, 5, 3),
                None,
                input_names=names,
                output_names=outputs,
                dynamo=True,
                dynamic_shapes=shapes,
                opset_version=opset,
                verbose=False,
                optimize=True,
                custom_translation_table=onnx_translations() if fused else None,
            )
        graph_model = program.model_proto
        if not plain:
            divide_by_root(graph_model.graph)
        return graph_model
    except (OSError, ExportError):
        raise  # a full disk is not an export failure; an ExportError says its own cause
    except Exception as exc:  # the exporter raises many types; one message names the model and the cause
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"Could not export {type(lm).__name__} with its key/value cache to ONNX: {type(exc).__name__}: {first}"
        ) from None


def _floats(lm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every floating-point parameter and buffer of `lm`, once each."""
    seen, out = set(), []
    for name, t in [*lm.named_parameters(), *lm.named_buffers()]:
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def _template(lm: nn.Module, form: str, opset: int):
    """(graph, {initializer: (tensor name, transposed)}) traced with every float parameter and buffer
    set to distinct random values — so no initializer was merged or folded because of the values — then
    each initializer found again by value; None when one is derived from several (folded) and so could
    not be written from the model's own tensors."""
    from onnx import numpy_helper

    tensors = _floats(lm)
    saved = [t.data for _, t in tensors]
    gen = torch.Generator().manual_seed(1234)
    try:
        with torch.no_grad():
            for _, t in tensors:
                t.data = (torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5).to(t.dtype)
            found = {}
            for name, t in tensors:
                value = t.detach().cpu().numpy()
                found[value.tobytes()] = (name, False)
                if value.ndim == 2:
                    found.setdefault(np.ascontiguousarray(value.T).tobytes(), (name, True))
            graph_model = _trace(lm, form, opset)
    finally:
        for (_, t), data in zip(tensors, saved):
            t.data = data
    mapping = {}
    for init in graph_model.graph.initializer:
        value = numpy_helper.to_array(init)
        hit = found.get(np.ascontiguousarray(value).tobytes()) if value.dtype.kind == "f" else None
        if hit is not None:
            mapping[init.name] = hit
            init.ClearField("raw_data")
        elif value.dtype.kind == "f" and value.size > 1:
            return None  # computed from the weights when traced: it would not follow new weights
    return graph_model, mapping


def _filled(template, lm: nn.Module):
    """The template's graph with `lm`'s own tensors written into its initializers."""
    import onnx
    from onnx import numpy_helper

    graph_model, mapping = template
    tensors = dict(_floats(lm))
    proto = onnx.ModelProto()
    proto.CopyFrom(graph_model)
    for init in proto.graph.initializer:
        if init.name in mapping:
            name, transposed = mapping[init.name]
            value = tensors[name].detach().cpu().numpy()
            value = np.ascontiguousarray(value.T if transposed else value).reshape(tuple(init.dims))
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return proto


def _agrees(proto, lm: nn.Module) -> bool:
    """The graph's logits and cache match PyTorch's on a short input with a cache (1e-3 of their scale)."""
    import onnxruntime as ort

    ids, mask, cache = _probe(lm)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for i in range(len(cache) // 2):
        feed[past_name(i, "key")], feed[past_name(i, "value")] = cache[2 * i].numpy(), cache[2 * i + 1].numpy()
    try:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, feed)
    except Exception:  # onnxruntime's errors have no common base: a graph it refuses does not agree
        return False
    with torch.no_grad():
        want = [t.float().numpy() for t in CachedDecoder(lm)(ids, mask, cache)]
    return _close(got, want)


def divide_by_root(graph) -> int:
    """Rewrite `Mul(x, Reciprocal(Sqrt(v)))` as `Div(x, Sqrt(v))` in an ONNX graph, in place, where the
    Reciprocal feeds nothing else (torch.export writes RMS norms' rsqrt that way; ONNX Runtime fuses
    only the Div form). The same arithmetic up to one rounding. Returns how many were rewritten."""
    from onnx import helper

    made = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    replaced, dropped = {}, set()
    for n in graph.node:
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        for side, name in enumerate(n.input):
            inverse = made.get(name)
            if inverse is None or inverse.op_type != "Reciprocal" or readers.get(name) != 1:
                continue
            root = made.get(inverse.input[0])
            if root is None or root.op_type != "Sqrt":
                continue
            replaced[id(n)] = helper.make_node(
                "Div", [n.input[1 - side], inverse.input[0]], list(n.output), name=(n.name or name) + "_div"
            )
            dropped.add(id(inverse))
            break
    if replaced:
        nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(nodes)
    return len(replaced)


class Generator:
    """Greedy or sampled generation from an ONNX artifact with a key/value cache, batch 1."""

    def __init__(self, session):
        self.session = session
        self.cache_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]

    def step(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray] | None):
        """Logits of the last position and the new cache."""
        feed = {"input_ids": ids, "attention_mask": mask}
        if past is None:
            feed = complete_feed(self.session, feed)
        else:
            feed.update(zip(self.cache_names, past))
        logits, *present = self.session.run(None, feed)
        return logits[:, -1], present

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        eos: int | set[int] | None = None,
        on_token=None,
    ) -> list[int]:
        """New token ids after `prompt` (greedy when temperature is 0); stops at `eos`."""
        rng = np.random.default_rng(seed)
        stops = {eos} if isinstance(eos, int) else set(eos or ())
        ids = np.asarray([prompt], dtype=np.int64)
        mask = np.ones_like(ids)
        logits, past = self.step(ids, mask, None)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = pick(logits[0], temperature, top_k, top_p, rng)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops or len(out) == max_new_tokens:
                break
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, past = self.step(np.asarray([[token]], np.int64), mask, past)
        return out

    def serve(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        """Seconds for the prompt's prefill and for `new_tokens` greedy decoding steps after it."""
        ids = np.asarray([prompt], dtype=np.int64)
        start = time.perf_counter()
        logits, past = self.step(ids, np.ones_like(ids), None)
        prefill = time.perf_counter() - start
        mask, token = np.ones_like(ids), int(logits[0].argmax())
        start = time.perf_counter()
        for _ in range(new_tokens):
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, past = self.step(np.asarray([[token]], np.int64), mask, past)
            token = int(logits[0].argmax())
        return prefill, time.perf_counter() - start

    def timing(self, prompt: list[int], new_tokens: int = 32, repeats: int = 3) -> dict:
        """Prefill milliseconds for `prompt` and greedy decoding tokens per second over `new_tokens`
        steps after it, medians of `repeats` runs after one warm-up run."""
        runs = [self.serve(prompt, new_tokens) for _ in range(repeats + 1)][1:]
        prefill_ms = 1000.0 * float(np.median([r[0] for r in runs]))
        seconds = float(np.median([r[1] for r in runs]))
        return {
            "prompt_tokens": len(prompt),
            "prefill_ms": prefill_ms,
            "decode_tokens": new_tokens,
            "decode_tokens_per_s": new_tokens / seconds,
            "decode_ms_per_token": 1000.0 * seconds / new_tokens,
            "repeats": repeats,
        }


def pick(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> int:
    """The next token: argmax at temperature 0, else a sample from the tempered distribution kept to
    the `top_k` most likely tokens and the smallest set whose probability reaches `top_p`."""
    if temperature <= 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


def verify_decoder(lm: nn.Module, session, prompt: torch.Tensor, steps: int = 10) -> dict:
    """Greedy decoding of `steps` tokens after `prompt` (1 x n ids) with PyTorch's cache and with the
    ONNX artifact's, each fed its own choice: the largest logit difference over every step, and
    whether the chosen tokens agree."""
    generator = Generator(session)
    ids = prompt.numpy().astype(np.int64)
    mask = np.ones_like(ids)
    got, past = generator.step(ids, mask, None)
    diffs, same = [], True
    with torch.no_grad():
        out = lm(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
        want, cache = out.logits[:, -1].float().numpy(), out.past_key_values
        for _ in range(steps):
            diffs.append(float(np.abs(got - want).max()))
            token = int(want[0].argmax())
            same &= token == int(got[0].argmax())
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            got, past = generator.step(np.asarray([[token]], np.int64), mask, past)
            out = lm(
                input_ids=torch.tensor([[token]]),
                attention_mask=torch.from_numpy(mask),
                past_key_values=cache,
                use_cache=True,
            )
            want, cache = out.logits[:, -1].float().numpy(), out.past_key_values
    return {"steps": steps, "max_abs_diff": max(diffs), "same_tokens": bool(same)}
