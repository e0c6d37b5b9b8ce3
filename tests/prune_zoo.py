"""The pruning coverage zoo: Hugging Face architectures built from small configs, PyTorch's own
transformer, and common idioms written the ways people write them. Random weights: for coverage
(does it capture, cut, run, reload), never for accuracy claims. Text encoders carry a classification
head, so their hidden size (the residual stream) is prunable too; a bare encoder whose output *is*
the hidden state keeps that width. Used by the tests and by
bench/prune_coverage.py (which builds the same models at realistic sizes)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- our own definitions


class SEBlock(nn.Module):
    """A residual block with squeeze-and-excitation; `spelling` is how the gate is broadcast."""

    def __init__(self, c: int, spelling: str):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Linear(c, c // 4), nn.Linear(c // 4, c)
        self.spelling = spelling

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3))))))
        if self.spelling == "none":
            s = s[:, :, None, None]
        elif self.spelling == "unsqueeze":
            s = s.unsqueeze(-1).unsqueeze(-1)
        else:
            b, c = s.shape
            s = s.view(b, c, 1, 1)
        return F.relu(x + y * s)


class SEResNet(nn.Module):
    def __init__(self, spelling: str = "none", width: int = 32, blocks: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[SEBlock(width, spelling) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ResNeXtBlock(nn.Module):
    def __init__(self, c: int, mid: int, groups: int):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.grouped = nn.Sequential(
            nn.Conv2d(mid, mid, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(mid), nn.ReLU()
        )
        self.expand = nn.Sequential(nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.expand(self.grouped(self.reduce(x))))


class ResNeXt(nn.Module):
    def __init__(self, width: int = 64, mid: int = 64, groups: int = 8, blocks: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[ResNeXtBlock(width, mid, groups) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class MBConv(nn.Module):
    """EfficientNet's block: expand, depthwise, squeeze-excite with SiLU, project, stochastic depth."""

    def __init__(self, c: int, expand: int = 4, drop: float = 0.1):
        super().__init__()
        mid = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.dw = nn.Sequential(
            nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU()
        )
        self.se_reduce, self.se_expand = nn.Conv2d(mid, c // 4, 1), nn.Conv2d(c // 4, mid, 1)
        self.project = nn.Sequential(nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c))
        self.drop = drop

    def forward(self, x):
        y = self.dw(self.expand(x))
        y = y * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        y = self.project(y)
        if self.training and self.drop:
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop
            y = y * keep / (1 - self.drop)
        return x + y


class EfficientNetish(nn.Module):
    def __init__(self, width: int = 32, blocks: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.SiLU()
        )
        self.blocks = nn.Sequential(*[MBConv(width) for _ in range(blocks)])
        self.head = nn.Sequential(
            nn.Conv2d(width, 4 * width, 1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(4 * width, classes),
        )

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class ShuffleUnit(nn.Module):
    """ShuffleNet v2's unit: split the channels, transform one half, concatenate, shuffle."""

    def __init__(self, c: int):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
        )

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        out = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNetish(nn.Module):
    def __init__(self, width: int = 64, units: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.units = nn.Sequential(*[ShuffleUnit(width) for _ in range(units)])
        self.conv = nn.Sequential(nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU())
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.fc(self.conv(self.units(self.stem(x))).mean((2, 3)))


def _double(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Encoder, decoder with ConvTranspose2d and with interpolation, skip concatenations."""

    def __init__(self, width: int = 16, classes: int = 3):
        super().__init__()
        w = width
        self.down1, self.down2, self.bottom = _double(3, w), _double(w, 2 * w), _double(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _double(4 * w, 2 * w)
        self.dec1 = _double(3 * w, w)
        self.out = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(F.max_pool2d(d1, 2))
        b = self.bottom(F.max_pool2d(d2, 2))
        u2 = self.dec2(torch.cat([self.up2(b), d2], dim=1))
        u1 = self.dec1(torch.cat([F.interpolate(u2, scale_factor=2.0, mode="nearest"), d1], dim=1))
        return self.out(u1)


class QKVAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for t in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.proj(out)


class FusedQKVAttention(nn.Module):
    """timm's attention: one qkv projection reshaped to (3, heads, head size), q/k/v unbound, and the
    result reshaped to the *input's* width."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool = False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), (FusedQKVAttention if fused else QKVAttention)(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, learned positions, separate q/k/v projections (or timm's fused one)."""

    def __init__(
        self,
        image: int = 32,
        patch: int = 8,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        classes: int = 10,
        fused: bool = False,
    ):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, fused) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class TorchTransformer(nn.Module):
    """PyTorch's own nn.TransformerEncoder (nn.MultiheadAttention inside) with a classifier."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, vocab: int = 100, classes: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.encoder(self.emb(ids)).mean(1))


# ----------------------------------------------------------------------------- Hugging Face, from configs


def _hf(model_cls: str, config_cls: str, **config):
    import transformers

    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))


def _text(batch: int, length: int, vocab: int = 1000) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, vocab, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }


def _lm(batch: int, length: int, vocab: int = 1000) -> dict:
    """What a user passes a causal LM: ids and mask (its key/value cache on, as by default)."""
    return _text(batch, length, vocab)


def _image(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _pixels(batch: int, size: int) -> dict:
    return {"pixel_values": _image(batch, size)}


SMALL_TEXT = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=128,
)
SMALL_LM = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)

# name -> (build, example inputs(batch, size), realistic size for the benchmark)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], object], int]] = {
    "hf-bert": (lambda: _hf("BertForSequenceClassification", "BertConfig", **SMALL_TEXT), _text, 128),
    "hf-distilbert": (
        lambda: _hf(
            "DistilBertForSequenceClassification",
            "DistilBertConfig",
            vocab_size=1000,
            dim=64,
            n_layers=2,
            n_heads=4,
            hidden_dim=128,
            max_position_embeddings=128,
        ),
        _text,
        128,
    ),
    "hf-roberta": (
        lambda: _hf(
            "RobertaForSequenceClassification", "RobertaConfig", **{**SMALL_TEXT, "max_position_embeddings": 160}
        ),
        _text,
        128,
    ),
    "hf-vit": (
        lambda: _hf(
            "ViTForImageClassification",
            "ViTConfig",
            image_size=224,
            patch_size=16,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=10,
        ),
        _pixels,
        224,
    ),
    "hf-resnet": (
        lambda: _hf(
            "ResNetForImageClassification",
            "ResNetConfig",
            embedding_size=16,
            hidden_sizes=[32, 64],
            depths=[1, 1],
            num_labels=10,
        ),
        _pixels,
        224,
    ),
    "hf-convnext": (
        lambda: _hf(
            "ConvNextForImageClassification",
            "ConvNextConfig",
            num_stages=2,
            hidden_sizes=[32, 64],
            depths=[1, 1],
            num_labels=10,
        ),
        _pixels,
        224,
    ),
    "hf-gpt2": (
        lambda: _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128),
        _lm,
        128,
    ),
    "hf-llama-gqa": (lambda: _hf("LlamaForCausalLM", "LlamaConfig", **SMALL_LM), _lm, 128),
    "hf-qwen2": (lambda: _hf("Qwen2ForCausalLM", "Qwen2Config", **SMALL_LM), _lm, 128),
    "torch-transformer": (TorchTransformer, lambda b, n: _text(b, n, 100)["input_ids"], 128),
    "resnext": (ResNeXt, _image, 224),
    "efficientnet": (EfficientNetish, _image, 224),
    "shufflenet": (ShuffleNetish, _image, 224),
    "unet": (UNet, _image, 224),
    "vit-qkv": (lambda: ViT(image=224, patch=16), _image, 224),
    "vit-fused-qkv": (lambda: ViT(image=224, patch=16, fused=True), _image, 224),
    "se-resnet-none": (lambda: SEResNet("none"), _image, 224),
    "se-resnet-unsqueeze": (lambda: SEResNet("unsqueeze"), _image, 224),
    "se-resnet-view": (lambda: SEResNet("view"), _image, 224),
}


FIXED_SIZE = {"hf-vit", "vit-qkv", "vit-fused-qkv"}  # learned positions fix the image size


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name][0]().eval()


def example(name: str, batch: int = 2, size: int | None = None):
    _, make, realistic = ZOO[name]
    small = realistic if name in FIXED_SIZE else 16 if make in (_text, _lm) or name == "torch-transformer" else 32
    return make(batch, size or small)


def run(model: nn.Module, inputs) -> torch.Tensor:
    """The model's main output as one tensor (logits or last hidden state)."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
