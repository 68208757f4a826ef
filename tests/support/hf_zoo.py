"""A zoo of real Hugging Face architectures, built from tiny configs, for gradient-check tests.

Each `ZooEntry` in `ZOO` builds a real `transformers` model class (LlamaForCausalLM,
GPT2LMHeadModel, T5ForConditionalGeneration, WhisperForConditionalGeneration, ...) from a tiny
config (hidden 32, two layers, vocabulary 32-96, batches of 4 with at most 16 tokens), so one
float64 forward and backward pass takes a few milliseconds on a CPU. Nothing is downloaded:
configs, tokenizers and feature extractors are all built in code, and `transformers` is only
imported when an entry is built or batched.

Batches are padded the way Hugging Face training pads them, with the real collators:

* causal LMs: `DataCollatorForLanguageModeling(tokenizer=tok, mlm=False)`: right padding,
  `attention_mask` 0 on pad, `labels` = `input_ids` with every pad-id position set to -100 (where
  the usual recipe sets pad = eos, as for GPT-2, Phi and Mistral, a real eos gets -100 too: that
  is what the collator does);
* T5 and BART: `DataCollatorForSeq2Seq(tokenizer=tok, label_pad_token_id=-100)` without a model
  (the model derives `decoder_input_ids` from the labels itself, the same shift that
  `prepare_decoder_input_ids_from_labels` would do);
* BERT and DistilBERT (masked LM): `DataCollatorForLanguageModeling(tokenizer=tok, mlm=True,
  mlm_probability=0.15, seed=...)`, labels -100 off the masked positions (a draw that masks
  nothing is redrawn with the next collator seed); RoBERTa (sequence classification):
  `DataCollatorWithPadding(tokenizer=tok)` with one class label per example;
* ViT: `ViTImageProcessorPil` (torchvision is not needed) on random images of four sizes, then
  `DefaultDataCollator()`;
* Whisper and wav2vec2: transformers ships no collator for these, so the batch reproduces the ones
  in Hugging Face's fine-tuning guides (`DataCollatorSpeechSeq2SeqWithPadding`,
  `DataCollatorCTCWithPadding`) line for line: the real feature extractor's `pad` for the audio,
  the tokenizer's `pad` for the transcripts, label padding replaced by -100 (and, for Whisper,
  the leading decoder-start token stripped).

Tokenizers are `PreTrainedTokenizerFast` objects around a `tokenizers` WordLevel model built in
code over the model's vocabulary, with the special tokens at the ids the real tokenizer family
uses where the tiny vocabulary allows (BERT [PAD] 0, RoBERTa/BART <pad> 1, T5 <pad> 0, Pythia
<|padding|> 1, GPT-2 <|endoftext|> last). Examples are token-id lists with the special tokens
placed as the real tokenizer places them, not text; lengths differ by 3, 5 and 8 tokens.

Determinism: `build()` initialises under `torch.random.fork_rng` with the entry's seed (the same
weights every call, the caller's global RNG untouched); `batch(seed)` draws from local generators.
Dropout keeps each architecture's config default (gradwatch evaluates in eval mode).

Attention uses `attn_implementation`: "eager" by default, `make_zoo("sdpa")` builds the other zoo.
Eager because `torch.func.vmap` has no batching rule for SDPA (nor for `ctc_loss`): it falls back
with a "performance drop" UserWarning, which pytest's `filterwarnings = error` turns into an error.

Precision of the float64 copy: transformers 5.x casts to float32 in Python in places, listed per
entry in `float32_ops`. In a plain `copy.deepcopy(model).double()` the loss of every causal LM and
of wav2vec2 is then float32-valued (`ForCausalLMLoss` calls `logits.float()`, `ForCTCLoss` takes
`log_softmax(dtype=torch.float32)`), RMSNorm and T5LayerNorm compute in float32 and eager
Llama-family/ViT attention takes its softmax in float32, so central differences bottom out near
1e-3..1e-2 relative error; and eager Llama-family attention gives a NaN loss when a query row is
fully masked (left padding, or a sliding window shorter than the padding: the float64 mask minimum
becomes -inf in the float32 softmax), hence right padding and Mistral's `sliding_window` left at
None (as in Mistral v0.2+). All of these are Python-level casts, which gradwatch's `Float64Guard`
keeps at float64 (under it every entry's central differences reach ~1e-10). `plant_float32_op`
is the kind it cannot see.

Two ways to plant faults, both living in the model's code (a cached per-class subclass with the
same class name is swapped in), so `copy.deepcopy(model)` and `model.double()` keep them and
`named_parameters()` and the state dict are unchanged:

* `plant_row_bug(model, "model.layers.0.self_attn.q_proj.weight", row=1, factor=1.5)`: the forward
  is bit-identical; the gradient autograd reports for that parameter has row `row` (dim 0)
  multiplied by `factor`. Works under `torch.func.functional_call` and `torch.func.vmap`.
* `plant_float32_op(model, "model.layers.0.mlp")`: that submodule's output goes through a numpy
  float32 round trip (an identity up to float32 rounding, as a C++ kernel with no float64 path
  would be) with a pass-through backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BATCH_SIZE",
    "ZOO",
    "AttnImplementation",
    "Kind",
    "RowBugFn",
    "ZooEntry",
    "make_zoo",
    "plant_float32_op",
    "plant_row_bug",
]

Kind = Literal["decoder", "encoder-decoder", "encoder", "vision", "speech"]
AttnImplementation = Literal["eager", "sdpa"]

ATTN_IMPLEMENTATION: AttnImplementation = "eager"
_LONGEST = 14  # tokens in the longest example of a text batch (specials included)
_SHORTER_BY = (0, 3, 5, 8)  # the other examples are this many tokens shorter (shuffled per seed)
BATCH_SIZE = len(_SHORTER_BY)  # examples per batch, every entry


@dataclass(frozen=True)
class ZooEntry:
    """One architecture: how to build it, how to batch for it, which parameters to check.

    `build()` returns a fresh model (training mode, as constructed) with the same weights on every
    call; `batch(seed)` a collated batch of `BATCH_SIZE` examples for that seed (the model's
    keyword arguments, `labels` included, so `model(**batch).loss` is the training loss);
    `targets` are fully qualified parameter names: layer 0 attention, layer 0 MLP input, last
    layer attention output, last layer MLP output (for encoder-decoders: encoder layer 0 and the
    last decoder layer's cross-attention output and MLP output). `model_class` is the
    transformers class built, `pad_token_id` the id that pads `input_ids` (None for ViT and
    wav2vec2, which pad pixels/audio), `float32_ops` where the float64 copy still computes in
    float32 inside transformers.
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], dict[str, Tensor]]
    targets: tuple[str, ...]
    kind: Kind
    model_class: str = ""
    attn_implementation: AttnImplementation = ATTN_IMPLEMENTATION
    pad_token_id: int | None = None
    float32_ops: tuple[str, ...] = ()


# ------------------------------------------------------------------ planted faults
class RowBugFn(torch.autograd.Function):
    """Identity forward; the backward multiplies row `row` (dim 0) of the gradient by `factor`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: Tensor, row: int, factor: float) -> Tensor:
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _weight, ctx.row, ctx.factor = inputs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        scale = torch.ones(grad.shape[0], dtype=grad.dtype, device=grad.device)
        scale[ctx.row] = ctx.factor
        return grad * scale.view(-1, *([1] * (grad.dim() - 1))), None, None


class _Float32RoundFn(torch.autograd.Function):
    """Forward: a numpy float32 round trip (identity up to float32 rounding). Backward: identity.

    The `vmap` rule runs the same round trip on the whole batched tensor (it is elementwise), so
    the fault also shows under `torch.func.vmap`.
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        rounded = x.detach().cpu().double().numpy().astype(np.float32)  # double: bf16 has no numpy
        return torch.from_numpy(rounded).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None], x: Tensor) -> tuple[Tensor, int | None]:
        return _Float32RoundFn.apply(x), in_dims[0]


_ROW_BUG_ATTR = "_zoo_row_bugs"
_FLOAT32_ATTR = "_zoo_float32_op"
_ROW_BUG_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
_FLOAT32_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _row_bug_class(base: type[nn.Module]) -> type[nn.Module]:
    """A subclass of `base` whose bugged parameters come back through `RowBugFn` when read."""
    if issubclass(base, tuple(_ROW_BUG_CLASSES.values())):  # already reads through the bug table
        return base
    cls = _ROW_BUG_CLASSES.get(base)
    if cls is None:
        base_getattr = base.__getattr__

        def __getattr__(self: nn.Module, name: str) -> Any:
            value = base_getattr(self, name)
            bugs = self.__dict__.get(_ROW_BUG_ATTR)
            if bugs and name in bugs and isinstance(value, Tensor):
                row, factor = bugs[name]
                return RowBugFn.apply(value, row, factor)
            return value

        # Same name as the base class: the bug sits in "the model's code", not in a visible wrapper.
        cls = type(
            base.__name__,
            (base,),
            {"__getattr__": __getattr__, "__module__": base.__module__,
             "__qualname__": base.__qualname__},
        )
        _ROW_BUG_CLASSES[base] = cls
    return cls


def _round_outputs(value: Any) -> Any:
    if isinstance(value, Tensor):
        return _Float32RoundFn.apply(value) if value.is_floating_point() else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_round_outputs(item) for item in value)
    if isinstance(value, list):
        return [_round_outputs(item) for item in value]
    if isinstance(value, Mapping):  # a ModelOutput: rebuild it with the same keys
        return type(value)(**{key: _round_outputs(item) for key, item in value.items()})
    return value


def _float32_class(base: type[nn.Module]) -> type[nn.Module]:
    """A subclass of `base` whose forward output goes through `_Float32RoundFn`."""
    if issubclass(base, tuple(_FLOAT32_CLASSES.values())):
        return base
    cls = _FLOAT32_CLASSES.get(base)
    if cls is None:
        base_forward = base.forward

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            output = base_forward(self, *args, **kwargs)
            return _round_outputs(output) if self.__dict__.get(_FLOAT32_ATTR) else output

        cls = type(
            base.__name__,
            (base,),
            {"forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__},
        )
        _FLOAT32_CLASSES[base] = cls
    return cls


def plant_row_bug(model: nn.Module, param_name: str, row: int = 1, factor: float = 1.5) -> None:
    """Make backprop report row `row` of `param_name`'s gradient multiplied by `factor`.

    The owning module's class is swapped for a cached subclass of it (same class name) whose
    `__getattr__` hands out the parameter through `RowBugFn`: an identity view forward (the loss
    is bit-identical), a backward that scales one row (dim 0). The parameter itself, its name in
    `named_parameters()` and the state dict are unchanged; `copy.deepcopy` and `.double()` keep the
    bug, and `torch.func.functional_call`/`vmap` run through it. Several bugs may be planted, also
    in one module. Central differences see the true gradient, so a gradient check must flag
    exactly this row.
    """
    module_name, _, short = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    parameter = module._parameters.get(short)
    if parameter is None:
        raise KeyError(f"{param_name!r} is not a parameter of {type(model).__name__}")
    if parameter.dim() == 0 or not -parameter.shape[0] <= row < parameter.shape[0]:
        raise IndexError(f"row {row} is out of range for {param_name} {tuple(parameter.shape)}")
    bugs = dict(module.__dict__.get(_ROW_BUG_ATTR) or {})
    bugs[short] = (row % parameter.shape[0], float(factor))
    module.__dict__[_ROW_BUG_ATTR] = bugs
    module.__class__ = _row_bug_class(type(module))


def plant_float32_op(model: nn.Module, module_name: str) -> None:
    """Make submodule `module_name` compute its output at float32 precision, invisibly.

    The module's class is swapped for a cached subclass (same class name) whose forward passes
    every floating tensor it returns through `_Float32RoundFn`: the forward converts to a numpy
    float32 array and back to the input dtype (an identity up to float32 rounding, like a compiled
    kernel with no float64 path; Python-level dtype checks still see float64), the backward passes
    the gradient through unchanged. In a float64 copy the loss then moves in float32-sized steps,
    so a central difference with step h carries an error of about 1e-7 * |output| / h while
    backprop stays float64-exact. Kept by `copy.deepcopy` and `.double()`; runs under
    `torch.func.vmap` (a custom vmap rule does the round trip on the whole batched tensor).
    """
    module = model.get_submodule(module_name)
    module.__dict__[_FLOAT32_ATTR] = True
    module.__class__ = _float32_class(type(module))


# ------------------------------------------------------------------ tokenizers and batches
@dataclass(frozen=True)
class _Vocab:
    """A tiny vocabulary: `specials` {id: token}, `roles` {"pad_token": token, ...}, `size` ids."""

    size: int
    specials: tuple[tuple[int, str], ...]
    roles: tuple[tuple[str, str], ...]

    def id(self, token: str) -> int:
        return next(i for i, t in self.specials if t == token)

    def role_id(self, role: str) -> int:
        return self.id(dict(self.roles)[role])

    @property
    def content(self) -> Tensor:
        """The ids of ordinary (non-special) tokens."""
        special = {i for i, _ in self.specials}
        return torch.tensor([i for i in range(self.size) if i not in special])


@functools.cache
def _tokenizer(vocab: _Vocab) -> Any:
    """A `PreTrainedTokenizerFast` (WordLevel, built offline) over `vocab`, padding on the right."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = dict(vocab.specials)
    table = {names.get(i, f"t{i}"): i for i in range(vocab.size)}
    unk = dict(vocab.roles).get("unk_token")
    backend = Tokenizer(models.WordLevel(vocab=table, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side="right", model_max_length=512, **dict(vocab.roles)
    )
    assert tokenizer.pad_token_id == vocab.role_id("pad_token")
    return tokenizer


def _shuffled_lengths(generator: torch.Generator, longest: int = _LONGEST) -> list[int]:
    order = torch.randperm(len(_SHORTER_BY), generator=generator).tolist()
    return [longest - _SHORTER_BY[i] for i in order]


def _token_ids(
    vocab: _Vocab, generator: torch.Generator, length: int, prefix: Sequence[int] = (),
    suffix: Sequence[int] = (),
) -> list[int]:
    """`length` ids in all: `prefix`, random ordinary tokens, `suffix`."""
    content = vocab.content
    middle = length - len(prefix) - len(suffix)
    drawn = content[torch.randint(len(content), (middle,), generator=generator)].tolist()
    return [*prefix, *drawn, *suffix]


def _hf(name: str) -> Any:
    """A class from `transformers`, imported on first use (the zoo itself imports it lazily)."""
    import transformers

    return getattr(transformers, name)


def _seeded_model(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _causal_lm_batch(vocab: _Vocab, prefix: Sequence[int], suffix: Sequence[int], seed: int
                     ) -> dict[str, Tensor]:
    from transformers import DataCollatorForLanguageModeling

    generator = torch.Generator().manual_seed(seed)
    features = []
    for length in _shuffled_lengths(generator):
        ids = _token_ids(vocab, generator, length, prefix, suffix)
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    collator = DataCollatorForLanguageModeling(tokenizer=_tokenizer(vocab), mlm=False)
    return dict(collator(features))


def _masked_lm_batch(vocab: _Vocab, prefix: Sequence[int], suffix: Sequence[int], seed: int,
                     token_type_ids: bool) -> dict[str, Tensor]:
    from transformers import DataCollatorForLanguageModeling

    generator = torch.Generator().manual_seed(seed)
    features = []
    for length in _shuffled_lengths(generator):
        ids = _token_ids(vocab, generator, length, prefix, suffix)
        feature = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if token_type_ids:
            feature["token_type_ids"] = [0] * len(ids)
        features.append(feature)
    # The collator masks from its own generator (seeded here, so the global RNG is untouched).
    # A draw that masks nothing would leave no label (loss NaN): then take the next collator seed.
    for attempt in range(100):
        collator = DataCollatorForLanguageModeling(
            tokenizer=_tokenizer(vocab), mlm=True, mlm_probability=0.15, seed=seed * 1000 + attempt
        )
        batch = dict(collator([dict(f) for f in features]))
        if (batch["labels"] != -100).any():
            return batch
    raise AssertionError("the MLM collator masked nothing in 100 draws")


def _classification_batch(vocab: _Vocab, prefix: Sequence[int], suffix: Sequence[int], seed: int,
                          num_labels: int) -> dict[str, Tensor]:
    from transformers import DataCollatorWithPadding

    generator = torch.Generator().manual_seed(seed)
    features = []
    for length in _shuffled_lengths(generator):
        ids = _token_ids(vocab, generator, length, prefix, suffix)
        label = int(torch.randint(num_labels, (), generator=generator))
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "label": label})
    return dict(DataCollatorWithPadding(tokenizer=_tokenizer(vocab))(features))


def _seq2seq_batch(vocab: _Vocab, prefix: Sequence[int], suffix: Sequence[int], seed: int
                   ) -> dict[str, Tensor]:
    from transformers import DataCollatorForSeq2Seq

    generator = torch.Generator().manual_seed(seed)
    features = []
    target_lengths = _shuffled_lengths(generator, longest=_LONGEST - 4)
    for length, target in zip(_shuffled_lengths(generator), target_lengths):
        ids = _token_ids(vocab, generator, length, prefix, suffix)
        labels = _token_ids(vocab, generator, target, prefix, suffix)
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    collator = DataCollatorForSeq2Seq(tokenizer=_tokenizer(vocab), label_pad_token_id=-100)
    return dict(collator(features))


# ------------------------------------------------------------------ decoders (causal LM)
def _decoder_layers(prefix: str, attn: str, mlp_in: str, attn_out: str, mlp_out: str
                    ) -> tuple[str, ...]:
    return (
        f"{prefix}.0.{attn}.weight", f"{prefix}.0.{mlp_in}.weight",
        f"{prefix}.1.{attn_out}.weight", f"{prefix}.1.{mlp_out}.weight",
    )


_LLAMA_TARGETS = _decoder_layers(
    "model.layers", "self_attn.q_proj", "mlp.up_proj", "self_attn.o_proj", "mlp.down_proj"
)
_SMALL: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 64}
_RMS_LOSS = ("RMSNorm casts hidden states to float32",
             "ForCausalLMLoss: logits.float() before cross-entropy")
_EAGER_SOFTMAX = "eager attention: softmax(..., dtype=torch.float32)"

# Llama-2 style ids: <unk> 0, <s> 1, </s> 2; fine-tuning recipes set pad = unk.
_LLAMA_VOCAB = _Vocab(64, ((0, "<unk>"), (1, "<s>"), (2, "</s>")),
                      (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>"),
                       ("pad_token", "<unk>")))
# Mistral: same ids; the usual recipe sets pad = eos (so a real </s> is -100 as well).
_MISTRAL_VOCAB = _Vocab(64, ((0, "<unk>"), (1, "<s>"), (2, "</s>")),
                        (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>"),
                         ("pad_token", "</s>")))
# Qwen2 chat: <|endoftext|> is the pad token, <|im_end|> ends a turn (eos).
_QWEN2_VOCAB = _Vocab(64, ((0, "<|endoftext|>"), (1, "<|im_start|>"), (2, "<|im_end|>")),
                      (("pad_token", "<|endoftext|>"), ("eos_token", "<|im_end|>")))
# Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3: a dedicated pad token.
_GEMMA_VOCAB = _Vocab(64, ((0, "<pad>"), (1, "<eos>"), (2, "<bos>"), (3, "<unk>")),
                      (("pad_token", "<pad>"), ("eos_token", "<eos>"), ("bos_token", "<bos>"),
                       ("unk_token", "<unk>")))
# GPT-NeoX (Pythia): <|endoftext|> 0, <|padding|> 1.
_NEOX_VOCAB = _Vocab(64, ((0, "<|endoftext|>"), (1, "<|padding|>")),
                     (("eos_token", "<|endoftext|>"), ("bos_token", "<|endoftext|>"),
                      ("unk_token", "<|endoftext|>"), ("pad_token", "<|padding|>")))
# GPT-2 / Phi: <|endoftext|> is the last id and doubles as pad (tokenizer.pad_token = eos_token).
_GPT2_VOCAB = _Vocab(80, ((79, "<|endoftext|>"),),
                     (("eos_token", "<|endoftext|>"), ("bos_token", "<|endoftext|>"),
                      ("unk_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>")))


def _causal_entry(name: str, model_class: str, config_class: str, config: dict[str, Any],
                  vocab: _Vocab, prefix: Sequence[str], suffix: Sequence[str],
                  targets: tuple[str, ...], attn: AttnImplementation, seed: int,
                  float32_ops: tuple[str, ...]) -> ZooEntry:
    prefix_ids = tuple(vocab.id(t) for t in prefix)
    suffix_ids = tuple(vocab.id(t) for t in suffix)

    def build() -> nn.Module:
        settings = _hf(config_class)(**config, vocab_size=vocab.size, attn_implementation=attn)
        return _seeded_model(seed, lambda: _hf(model_class)(settings))

    def batch(batch_seed: int) -> dict[str, Tensor]:
        return _causal_lm_batch(vocab, prefix_ids, suffix_ids, batch_seed)

    return ZooEntry(name, build, batch, targets, "decoder", model_class, attn,
                    vocab.role_id("pad_token"), float32_ops)


def _decoders(attn: AttnImplementation, seed: int) -> list[ZooEntry]:
    softmax = (_EAGER_SOFTMAX,) if attn == "eager" else ()
    llama_like = {**_SMALL, "num_key_value_heads": 2}
    llama = _causal_entry(
        "llama", "LlamaForCausalLM", "LlamaConfig",
        {**llama_like, "bos_token_id": 1, "eos_token_id": 2},
        _LLAMA_VOCAB, ["<s>"], ["</s>"], _LLAMA_TARGETS, attn, seed, _RMS_LOSS + softmax,
    )
    mistral = _causal_entry(
        "mistral", "MistralForCausalLM", "MistralConfig",
        {**llama_like, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None},
        _MISTRAL_VOCAB, ["<s>"], ["</s>"], _LLAMA_TARGETS, attn, seed, _RMS_LOSS + softmax,
    )
    qwen2 = _causal_entry(
        "qwen2", "Qwen2ForCausalLM", "Qwen2Config",
        {**llama_like, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0,
         "tie_word_embeddings": True},
        _QWEN2_VOCAB, ["<|im_start|>"], ["<|im_end|>"], _LLAMA_TARGETS, attn, seed,
        _RMS_LOSS + softmax,
    )
    gemma = _causal_entry(
        "gemma", "GemmaForCausalLM", "GemmaConfig",
        {**_SMALL, "num_key_value_heads": 1, "head_dim": 8, "pad_token_id": 0,
         "eos_token_id": 1, "bos_token_id": 2},
        _GEMMA_VOCAB, ["<bos>"], ["<eos>"], _LLAMA_TARGETS, attn, seed,
        ("GemmaRMSNorm computes in float32 (x.float())", _RMS_LOSS[1], *softmax),
    )
    phi = _causal_entry(
        "phi", "PhiForCausalLM", "PhiConfig",
        {**_SMALL, "partial_rotary_factor": 0.5, "bos_token_id": 79, "eos_token_id": 79},
        _GPT2_VOCAB, [], ["<|endoftext|>"],
        _decoder_layers("model.layers", "self_attn.q_proj", "mlp.fc1", "self_attn.dense",
                        "mlp.fc2"),
        attn, seed, (_RMS_LOSS[1], *softmax),
    )
    gpt_neox = _causal_entry(
        "gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig",
        {**_SMALL, "rotary_pct": 0.5, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1},
        _NEOX_VOCAB, [], ["<|endoftext|>"],
        _decoder_layers("gpt_neox.layers", "attention.query_key_value", "mlp.dense_h_to_4h",
                        "attention.dense", "mlp.dense_4h_to_h"),
        attn, seed, (_RMS_LOSS[1], *softmax),
    )
    gpt2 = _causal_entry(
        "gpt2", "GPT2LMHeadModel", "GPT2Config",
        {"n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 79,
         "eos_token_id": 79, "loss_type": "ForCausalLM"},
        _GPT2_VOCAB, [], ["<|endoftext|>"],
        _decoder_layers("transformer.h", "attn.c_attn", "mlp.c_fc", "attn.c_proj", "mlp.c_proj"),
        attn, seed, (_RMS_LOSS[1],),
    )
    return [llama, mistral, qwen2, gemma, phi, gpt_neox, gpt2]


# ------------------------------------------------------------------ encoder-decoders
# T5: <pad> 0, </s> 1, <unk> 2; decoder_start_token_id = pad.
_T5_VOCAB = _Vocab(64, ((0, "<pad>"), (1, "</s>"), (2, "<unk>")),
                   (("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>")))
# BART: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> last.
_BART_VOCAB = _Vocab(64, ((0, "<s>"), (1, "<pad>"), (2, "</s>"), (3, "<unk>"), (63, "<mask>")),
                     (("bos_token", "<s>"), ("pad_token", "<pad>"), ("eos_token", "</s>"),
                      ("unk_token", "<unk>"), ("mask_token", "<mask>"), ("cls_token", "<s>"),
                      ("sep_token", "</s>")))


def _t5(attn: AttnImplementation, seed: int) -> ZooEntry:
    def build() -> nn.Module:
        config = _hf("T5Config")(
            vocab_size=_T5_VOCAB.size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, attn_implementation=attn,
        )
        return _seeded_model(seed, lambda: _hf("T5ForConditionalGeneration")(config))

    def batch(batch_seed: int) -> dict[str, Tensor]:
        return _seq2seq_batch(_T5_VOCAB, (), (_T5_VOCAB.id("</s>"),), batch_seed)

    targets = (
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi.weight",
        "decoder.block.1.layer.1.EncDecAttention.o.weight",
        "decoder.block.1.layer.2.DenseReluDense.wo.weight",
    )
    return ZooEntry("t5", build, batch, targets, "encoder-decoder", "T5ForConditionalGeneration",
                    attn, 0, ("T5LayerNorm computes the variance in float32",))


def _bart(attn: AttnImplementation, seed: int) -> ZooEntry:
    def build() -> nn.Module:
        config = _hf("BartConfig")(
            vocab_size=_BART_VOCAB.size, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=64, bos_token_id=0, pad_token_id=1,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
            attn_implementation=attn,
        )
        return _seeded_model(seed, lambda: _hf("BartForConditionalGeneration")(config))

    def batch(batch_seed: int) -> dict[str, Tensor]:
        v = _BART_VOCAB
        return _seq2seq_batch(v, (v.id("<s>"),), (v.id("</s>"),), batch_seed)

    targets = (
        "model.encoder.layers.0.self_attn.q_proj.weight",
        "model.encoder.layers.0.fc1.weight",
        "model.decoder.layers.1.encoder_attn.out_proj.weight",
        "model.decoder.layers.1.fc2.weight",
    )
    return ZooEntry("bart", build, batch, targets, "encoder-decoder",
                    "BartForConditionalGeneration", attn, 1, ())


# ------------------------------------------------------------------ encoders
# BERT: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4.
_BERT_VOCAB = _Vocab(96, ((0, "[PAD]"), (1, "[UNK]"), (2, "[CLS]"), (3, "[SEP]"), (4, "[MASK]")),
                     (("pad_token", "[PAD]"), ("unk_token", "[UNK]"), ("cls_token", "[CLS]"),
                      ("sep_token", "[SEP]"), ("mask_token", "[MASK]")))
# RoBERTa: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> last.
_ROBERTA_VOCAB = _Vocab(
    96, ((0, "<s>"), (1, "<pad>"), (2, "</s>"), (3, "<unk>"), (95, "<mask>")),
    (("bos_token", "<s>"), ("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
     ("mask_token", "<mask>"), ("cls_token", "<s>"), ("sep_token", "</s>")),
)
_ENCODER: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64}


def _bert_targets(prefix: str) -> tuple[str, ...]:
    return (
        f"{prefix}.encoder.layer.0.attention.self.query.weight",
        f"{prefix}.encoder.layer.0.intermediate.dense.weight",
        f"{prefix}.encoder.layer.1.attention.output.dense.weight",
        f"{prefix}.encoder.layer.1.output.dense.weight",
    )


def _bert(attn: AttnImplementation, seed: int) -> ZooEntry:
    v = _BERT_VOCAB

    def build() -> nn.Module:
        config = _hf("BertConfig")(
            **_ENCODER, vocab_size=v.size, max_position_embeddings=64, pad_token_id=0,
            attn_implementation=attn,
        )
        return _seeded_model(seed, lambda: _hf("BertForMaskedLM")(config))

    def batch(batch_seed: int) -> dict[str, Tensor]:
        return _masked_lm_batch(v, (v.id("[CLS]"),), (v.id("[SEP]"),), batch_seed, True)

    return ZooEntry("bert", build, batch, _bert_targets("bert"), "encoder", "BertForMaskedLM",
                    attn, 0, ())


def _roberta(attn: AttnImplementation, seed: int) -> ZooEntry:
    v = _ROBERTA_VOCAB

    def build() -> nn.Module:
        # RoBERTa position ids start after pad_token_id: 64 positions + 2
        config = _hf("RobertaConfig")(
            **_ENCODER, vocab_size=v.size, max_position_embeddings=66, bos_token_id=0,
            pad_token_id=1, eos_token_id=2, num_labels=3, attn_implementation=attn,
        )
        return _seeded_model(seed, lambda: _hf("RobertaForSequenceClassification")(config))

    def batch(batch_seed: int) -> dict[str, Tensor]:
        return _classification_batch(v, (v.id("<s>"),), (v.id("</s>"),), batch_seed, 3)

    return ZooEntry("roberta", build, batch, _bert_targets("roberta"), "encoder",
                    "RobertaForSequenceClassification", attn, 1, ())


def _distilbert(attn: AttnImplementation, seed: int) -> ZooEntry:
    v = _BERT_VOCAB

    def build() -> nn.Module:
        config = _hf("DistilBertConfig")(
            vocab_size=v.size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
            max_position_embeddings=64, pad_token_id=0, attn_implementation=attn,
        )
        return _seeded_model(seed, lambda: _hf("DistilBertForMaskedLM")(config))

    def batch(batch_seed: int) -> dict[str, Tensor]:
        return _masked_lm_batch(v, (v.id("[CLS]"),), (v.id("[SEP]"),), batch_seed, False)

    prefix = "distilbert.transformer.layer"
    targets = (
        f"{prefix}.0.attention.q_lin.weight", f"{prefix}.0.ffn.lin1.weight",
        f"{prefix}.1.attention.out_lin.weight", f"{prefix}.1.ffn.lin2.weight",
    )
    return ZooEntry("distilbert", build, batch, targets, "encoder", "DistilBertForMaskedLM",
                    attn, 0, ())


# ------------------------------------------------------------------ vision
def _vit(attn: AttnImplementation, seed: int) -> ZooEntry:
    def build() -> nn.Module:
        config = _hf("ViTConfig")(
            **_ENCODER, image_size=16, patch_size=4, num_channels=3, num_labels=5,
            attn_implementation=attn,
        )
        return _seeded_model(seed, lambda: _hf("ViTForImageClassification")(config))

    def batch(batch_seed: int) -> dict[str, Tensor]:
        from transformers import DefaultDataCollator, ViTImageProcessorPil

        rng = np.random.default_rng(batch_seed)
        processor = ViTImageProcessorPil(size={"height": 16, "width": 16})
        features = []
        for height, width in ((20, 24), (16, 16), (28, 18), (24, 30)):
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            pixels = processor(image, return_tensors="np")["pixel_values"][0]
            features.append({"pixel_values": pixels, "label": int(rng.integers(5))})
        return dict(DefaultDataCollator()(features))

    targets = (
        "vit.layers.0.attention.q_proj.weight", "vit.layers.0.mlp.fc1.weight",
        "vit.layers.1.attention.o_proj.weight", "vit.layers.1.mlp.fc2.weight",
    )
    return ZooEntry("vit", build, batch, targets, "vision", "ViTForImageClassification", attn,
                    None, (_EAGER_SOFTMAX,) if attn == "eager" else ())


# ------------------------------------------------------------------ speech
# Whisper: <|endoftext|> is eos and pad; labels start <|startoftranscript|> <|en|> <|transcribe|>
# <|notimestamps|>.
_WHISPER_VOCAB = _Vocab(
    64, ((0, "<|endoftext|>"), (1, "<|startoftranscript|>"), (2, "<|en|>"), (3, "<|transcribe|>"),
         (4, "<|notimestamps|>")),
    (("eos_token", "<|endoftext|>"), ("bos_token", "<|endoftext|>"),
     ("unk_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>")),
)
_SAMPLING_RATE = 16000


def _whisper(attn: AttnImplementation, seed: int) -> ZooEntry:
    v = _WHISPER_VOCAB

    def build() -> nn.Module:
        config = _hf("WhisperConfig")(
            vocab_size=v.size, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_source_positions=50, max_target_positions=32,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, decoder_start_token_id=1,
            suppress_tokens=[], begin_suppress_tokens=[0], attn_implementation=attn,
        )
        return _seeded_model(seed, lambda: _hf("WhisperForConditionalGeneration")(config))

    def batch(batch_seed: int) -> dict[str, Tensor]:
        from transformers import WhisperFeatureExtractor

        # 1 s windows at 16 kHz, hop 160: 100 frames = 2 * max_source_positions.
        extractor = WhisperFeatureExtractor(feature_size=8, sampling_rate=_SAMPLING_RATE,
                                            hop_length=160, chunk_length=1, n_fft=400)
        tokenizer = _tokenizer(v)
        generator = torch.Generator().manual_seed(batch_seed)
        rng = np.random.default_rng(batch_seed)
        start = [v.id(t) for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                   "<|notimestamps|>")]
        inputs, labels = [], []
        for length in _shuffled_lengths(generator, longest=16):
            audio = (0.1 * rng.standard_normal(int(rng.integers(4000, 14000)))).astype(np.float32)
            features = extractor(audio, sampling_rate=_SAMPLING_RATE, return_tensors="np")
            inputs.append({"input_features": features["input_features"][0]})
            labels.append({"input_ids": _token_ids(v, generator, length, start, (0,))})
        # DataCollatorSpeechSeq2SeqWithPadding from the Whisper fine-tuning guide:
        out = extractor.pad(inputs, return_tensors="pt")
        padded = tokenizer.pad(labels, return_tensors="pt")
        ids = padded["input_ids"].masked_fill(padded["attention_mask"].ne(1), -100)
        if (ids[:, 0] == 1).all().item():  # the model prepends decoder_start_token_id itself
            ids = ids[:, 1:]
        return {"input_features": out["input_features"], "labels": ids}

    targets = (
        "model.encoder.layers.0.self_attn.q_proj.weight",
        "model.encoder.layers.0.fc1.weight",
        "model.decoder.layers.1.encoder_attn.out_proj.weight",
        "model.decoder.layers.1.fc2.weight",
    )
    return ZooEntry("whisper", build, batch, targets, "speech",
                    "WhisperForConditionalGeneration", attn, 0, ())


# wav2vec2 CTC: <pad> 0 is also the CTC blank; "|" separates words.
_CTC_VOCAB = _Vocab(32, ((0, "<pad>"), (1, "<s>"), (2, "</s>"), (3, "<unk>"), (4, "|")),
                    (("pad_token", "<pad>"), ("bos_token", "<s>"), ("eos_token", "</s>"),
                     ("unk_token", "<unk>")))


def _wav2vec2(attn: AttnImplementation, seed: int) -> ZooEntry:
    v = _CTC_VOCAB

    def build() -> nn.Module:
        # wav2vec2-large-lv60 layout (layer-norm feature encoder, stable layer norm) so the
        # feature extractor returns an attention mask; total conv stride 40 samples.
        config = _hf("Wav2Vec2Config")(
            vocab_size=v.size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, conv_dim=(16, 16, 16), conv_stride=(5, 4, 2),
            conv_kernel=(10, 8, 4), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
            feat_extract_norm="layer", do_stable_layer_norm=True, pad_token_id=0,
            ctc_loss_reduction="mean", attn_implementation=attn,
        )
        return _seeded_model(seed, lambda: _hf("Wav2Vec2ForCTC")(config))

    def batch(batch_seed: int) -> dict[str, Tensor]:
        from transformers import Wav2Vec2FeatureExtractor

        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=_SAMPLING_RATE,
                                             padding_value=0.0, do_normalize=True,
                                             return_attention_mask=True)
        tokenizer = _tokenizer(v)
        generator = torch.Generator().manual_seed(batch_seed)
        rng = np.random.default_rng(batch_seed)
        inputs, labels = [], []
        for length in _shuffled_lengths(generator, longest=12):
            samples = 40 * (4 * length + int(rng.integers(0, 6)))  # ~4 frames per label
            audio = (0.1 * rng.standard_normal(samples)).astype(np.float32)
            features = extractor(audio, sampling_rate=_SAMPLING_RATE)
            inputs.append({"input_values": features["input_values"][0]})
            labels.append({"input_ids": _token_ids(v, generator, length)})
        # DataCollatorCTCWithPadding from the wav2vec2 fine-tuning guide:
        out = extractor.pad(inputs, padding=True, return_tensors="pt")
        padded = tokenizer.pad(labels, padding=True, return_tensors="pt")
        ids = padded["input_ids"].masked_fill(padded["attention_mask"].ne(1), -100)
        return {"input_values": out["input_values"], "attention_mask": out["attention_mask"],
                "labels": ids}

    prefix = "wav2vec2.encoder.layers"
    targets = (
        f"{prefix}.0.attention.q_proj.weight", f"{prefix}.0.feed_forward.intermediate_dense.weight",
        f"{prefix}.1.attention.out_proj.weight", f"{prefix}.1.feed_forward.output_dense.weight",
    )
    return ZooEntry("wav2vec2", build, batch, targets, "speech", "Wav2Vec2ForCTC", attn, None,
                    ("ForCTCLoss: log_softmax(..., dtype=torch.float32)",))


# ------------------------------------------------------------------ the zoo
def make_zoo(attn_implementation: AttnImplementation = ATTN_IMPLEMENTATION, seed: int = 0
             ) -> dict[str, ZooEntry]:
    """All entries, with `attn_implementation` ("eager" or "sdpa") and weights from `seed`."""
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa': {attn_implementation!r}")
    entries = [
        *_decoders(attn_implementation, seed),
        _t5(attn_implementation, seed),
        _bart(attn_implementation, seed),
        _bert(attn_implementation, seed),
        _roberta(attn_implementation, seed),
        _distilbert(attn_implementation, seed),
        _vit(attn_implementation, seed),
        _whisper(attn_implementation, seed),
        _wav2vec2(attn_implementation, seed),
    ]
    return {entry.name: entry for entry in entries}


ZOO: dict[str, ZooEntry] = make_zoo()
