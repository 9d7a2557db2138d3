"""MatFormer sub-models of Gemma 3n ("Mix-n-Match"): smaller models inside a larger one.

A sub-model is a set of decoder layers to skip and an FFN width for each kept layer. Kept
layers are renumbered; their gate and up projections keep rows [:w], the down projection keeps
columns [:w]; the Per-Layer Embedding table and `per_layer_model_projection` keep the kept
layers' blocks; `num_kv_shared_layers` drops by the skipped layers inside the KV-shared block;
the sparsity pattern keeps the kept layers' entries. Nothing else changes.

    Submodel.preset("E2.54B")
    Submodel(layers_to_skip=[20, 21, 22, 23, 24], ffn_hidden_dims=[8192])
    model(ids, submodel="E2.54B")       # run elastically from one loaded E4B (see `plan`)

`slicing.py` writes a sub-model to disk as a checkpoint of its own.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from .config import ModelConfig, TextConfig
from .errors import InputError
from .plan import Plan, kv_source

@dataclass(frozen=True)
class Preset:
    """A published sub-model of E4B (Google's slicing configs and their pre-trained MMLU)."""

    name: str
    skipped: tuple[int, ...]
    wide: tuple[int, ...]  # kept layers at 16384; the others at 8192
    effective_params_b: float
    mmlu: float


def _span(first: int, last: int) -> tuple[int, ...]:
    return tuple(range(first, last + 1))


E4B_LAYERS = 35
_NARROW, _WIDE = 8192, 16384
PRESETS: tuple[Preset, ...] = (
    Preset("E4B", (), _span(0, 34), 3.98, 62.30),
    Preset("E2B", _span(20, 24), (), 1.91, 50.90),
    Preset("E1.96B", _span(20, 24), (4,), 1.96, 53.40),
    Preset("E2.54B", (), (4, *_span(20, 24)), 2.54, 55.40),
    Preset("E2.69B", (), (4, 9, 14, *_span(19, 24)), 2.69, 57.70),
    Preset("E2.98B", (), (*_span(15, 24), *_span(30, 34)), 2.98, 59.50),
    Preset("E3.18B", (), (4, *_span(9, 24), 29, 34), 3.18, 61.80),
    Preset("E3.39B", (), (4, *_span(9, 29), 34), 3.39, 63.00),
    Preset("E3.59B", (), (*_span(4, 29), 34), 3.59, 63.40),
    Preset("E3.79B", (), _span(4, 34), 3.79, 63.40),
    Preset("E2.49B-block", (), _span(20, 24), 2.49, 54.50),
    Preset("E2.73B-block", (), _span(15, 24), 2.73, 57.10),
    Preset("E2.98B-block", (), _span(10, 24), 2.98, 59.50),
    Preset("E3.24B-block", (), _span(10, 29), 3.24, 60.70),
    Preset("E3.49B-block", (), _span(5, 29), 3.49, 61.40),
    # Google's table names it E3.79B, but with five narrow layers it has 3.74 B (as it says).
    Preset("E3.79B-block", (), _span(5, 34), 3.74, 62.00),
)


def _text(config: TextConfig | ModelConfig) -> TextConfig:
    return config.text if isinstance(config, ModelConfig) else config


def _ints(values, what: str) -> tuple[int, ...]:
    values = (values,) if isinstance(values, int) else tuple(values or ())
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be whole numbers, not {list(values)}.") from None


@dataclass(frozen=True)
class Submodel:
    """Layers to skip and FFN widths: one per kept layer, one for all, or none (as stored)."""

    layers_to_skip: tuple[int, ...] = ()
    ffn_hidden_dims: tuple[int, ...] = ()
    name: str | None = None
    num_layers: int | None = None  # the layer count the recipe is written for (presets: E4B's)

    def __post_init__(self):
        object.__setattr__(self, "layers_to_skip", tuple(sorted(set(_ints(self.layers_to_skip, "layers_to_skip")))))
        object.__setattr__(self, "ffn_hidden_dims", _ints(self.ffn_hidden_dims, "ffn_hidden_dims"))

    @classmethod
    def preset(cls, name: str) -> "Submodel":
        """One of `PRESETS` by name (any case), as a recipe for E4B."""
        found = {p.name.lower(): p for p in PRESETS}.get(name.strip().lower())
        if found is None:
            raise InputError(f"Unknown preset {name!r}: choose one of {', '.join(p.name for p in PRESETS)}.")
        kept = [i for i in range(E4B_LAYERS) if i not in found.skipped]
        widths = [_WIDE if i in found.wide else _NARROW for i in kept]
        return cls(found.skipped, widths, name=found.name, num_layers=E4B_LAYERS)

    @property
    def _label(self) -> str:
        return f"preset {self.name}" if self.name else "the sub-model"

    def validate(self, config: TextConfig | ModelConfig) -> None:
        """Refuse, in one sentence, a recipe that does not fit `config` or would break the model."""
        self.widths(config)

    def kept_layers(self, config: TextConfig | ModelConfig) -> tuple[int, ...]:
        """Stored indices of the layers the sub-model runs."""
        t = _text(config)
        n = t.num_hidden_layers
        if self.num_layers is not None and self.num_layers != n:
            raise InputError(
                f"{self._label} is written for a {self.num_layers}-layer model (E4B) and this model has {n} "
                "layers: choose a recipe for this model."
            )
        if bad := [i for i in self.layers_to_skip if not 0 <= i < n]:
            raise InputError(f"layers_to_skip names layer {bad[0]}, but this model's layers are 0-{n - 1}.")
        first_shared = t.first_kv_shared_layer
        sources = sorted({kv_source(t, i) for i in range(first_shared, n)})
        if bad := [i for i in self.layers_to_skip if i in sources]:
            raise InputError(
                f"layer {bad[0]} cannot be skipped: the KV-shared layers {first_shared}-{n - 1} reuse its keys "
                f"and values (layers {' and '.join(map(str, sources))} must stay)."
            )
        kept = tuple(i for i in range(n) if i not in self.layers_to_skip)
        if not kept:
            raise InputError(f"{self._label} skips every layer: keep at least one.")
        return kept

    def widths(self, config: TextConfig | ModelConfig) -> tuple[int, ...]:
        """The FFN width of each kept layer."""
        t = _text(config)
        kept = self.kept_layers(t)
        stored = [t.intermediate_size[i] for i in kept]
        dims = self.ffn_hidden_dims
        if not dims:
            return tuple(stored)
        if len(dims) not in (1, len(kept)):
            raise InputError(
                f"ffn_hidden_dims has {len(dims)} widths for {len(kept)} kept layers: give one per kept layer or one for all."
            )
        widths = dims * len(kept) if len(dims) == 1 else dims
        for layer, width, have in zip(kept, widths, stored):
            if not 0 < width <= have:
                raise InputError(
                    f"ffn_hidden_dims asks for width {width} at layer {layer}, which stores {have}: "
                    f"a sub-model keeps between 1 and {have} there."
                )
        return tuple(widths)

    def num_kv_shared_layers(self, config: TextConfig | ModelConfig) -> int:
        t = _text(config)
        return t.num_kv_shared_layers - sum(i >= t.first_kv_shared_layer for i in self.layers_to_skip)

    def sliced_config(self, config: TextConfig | dict) -> dict:
        """The text config (a config.json `text_config` dict) of the sub-model; other fields as given."""
        raw = dict(config) if isinstance(config, dict) else asdict(config)
        t = TextConfig.from_dict(raw) if isinstance(config, dict) else config
        kept = self.kept_layers(t)
        raw.update(
            num_hidden_layers=len(kept),
            intermediate_size=list(self.widths(t)),
            layer_types=[t.layer_types[i] for i in kept],
            activation_sparsity_pattern=[t.activation_sparsity_pattern[i] for i in kept],
            num_kv_shared_layers=self.num_kv_shared_layers(t),
        )
        return raw

    def effective_parameters(self, config: TextConfig | ModelConfig) -> int:
        return effective_parameters(TextConfig.from_dict(self.sliced_config(_text(config))))


def effective_parameters(config: TextConfig | ModelConfig) -> int:
    """Parameters that work on every token, as Google counts them: the decoder without the token
    and Per-Layer Embedding tables and without the towers; the KV-shared layers' K/V projections
    are counted, as the published files carry them (E4B: 3,980,491,248)."""
    t = _text(config)
    h, d, n = t.hidden_size, t.hidden_size_per_layer_input, t.altup_num_inputs
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    attention = 2 * h * q + 2 * h * kv + 2 * t.head_dim  # q, o, k, v and the q/k norms
    altup = n * n + n**3 + n * h + 2 * h  # correction and prediction coefs, router, its norm, output scale
    laurel = 2 * h * t.laurel_rank + h
    per_layer_input = 2 * h * d + h
    layer = attention + altup + laurel + per_layer_input + 4 * h  # + the four sandwich norms
    layers = sum(layer + 3 * h * width for width in t.intermediate_size)
    return layers + t.num_hidden_layers * d * h + d + 2 * (n - 1) * h * h + h


@functools.lru_cache(maxsize=64)
def _plan(submodel: Submodel, config: TextConfig) -> Plan:
    return Plan.of(config, submodel.kept_layers(config), submodel.widths(config), submodel.name or "sub-model")


def plan_for(config: TextConfig | ModelConfig, submodel: "Submodel | str | Plan | None") -> Plan | None:
    """The plan that runs `submodel` (a `Submodel`, a preset's name, or a ready `Plan`) on the model
    of `config`, computed once per recipe; None for the full model."""
    if submodel is None or isinstance(submodel, Plan):
        return submodel
    if isinstance(submodel, str):
        submodel = Submodel.preset(submodel)
    if not isinstance(submodel, Submodel):
        raise InputError(f"submodel is {submodel!r}: give a Submodel or a preset's name such as 'E2B'.")
    return _plan(submodel, _text(config))
