"""Which decoder layers run for a request, and how: a `Plan`.

The full model is one plan; a MatFormer sub-model (fewer layers, narrower feed-forwards) is
another, over the same loaded weights. A plan is computed once from the config and passed to
the decoder with each call: the decoder itself holds no choice of layers.

The K/V-sharing rule lives here. The upper `num_kv_shared_layers` layers compute no keys and
values of their own: each attends over those of the last layer of its attention type below
the shared block. Only the layers below that block fill caches, one slot each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import TextConfig
from .errors import InputError


def kv_source(config: TextConfig, layer: int) -> int:
    """The stored layer whose keys and values `layer` attends over (itself unless KV-shared)."""
    if layer < config.first_kv_shared_layer:
        return layer
    kind = config.layer_types[layer]
    return max(i for i in range(config.first_kv_shared_layer) if config.layer_types[i] == kind)


@dataclass(frozen=True)
class LayerStep:
    layer: int  # the stored layer: its weights, its block of the per-layer inputs, its sparsity
    ffn_width: int  # how much of its feed-forward runs (a prefix of the stored width)
    attention: str  # "sliding_attention" or "full_attention"
    kv_source: int  # the step whose keys and values it attends over (itself unless KV-shared)
    cache_slot: int | None  # its cache in the request's cache list; None for a KV-shared layer
    feeds_shared: bool  # a KV-shared step above reads its keys and values


@dataclass(frozen=True)
class Plan:
    steps: tuple[LayerStep, ...]
    name: str = "full"

    @classmethod
    def full(cls, config: TextConfig) -> "Plan":
        return cls.of(config, range(config.num_hidden_layers), config.intermediate_size)

    @classmethod
    def of(cls, config: TextConfig, layers: Sequence[int], widths: Sequence[int], name: str = "full") -> "Plan":
        """The plan that runs the stored `layers` (ascending) with the feed-forward `widths`."""
        layers, widths = tuple(layers), tuple(widths)
        if len(widths) != len(layers):
            raise InputError(f"{len(widths)} feed-forward widths were given for {len(layers)} layers: give one per kept layer.")
        if list(layers) != sorted(set(layers)) or not layers or layers[0] < 0 or layers[-1] >= config.num_hidden_layers:
            raise InputError(f"The layers to run must be distinct, ascending indices below {config.num_hidden_layers}.")
        sources = {layer: kv_source(config, layer) for layer in layers}
        if missing := sorted(set(sources.values()) - set(layers)):
            raise InputError(
                f"Layer {missing[0]} cannot be skipped: the KV-shared layers above it attend over its keys and values."
            )
        position = {layer: p for p, layer in enumerate(layers)}
        readers = {sources[layer] for layer in layers if sources[layer] != layer}
        steps, slots = [], 0
        for layer, width in zip(layers, widths):
            stored = config.intermediate_size[layer]
            if not 0 < width <= stored:
                raise InputError(f"Layer {layer} stores a feed-forward {stored} wide: a width of {width} cannot run.")
            own = sources[layer] == layer
            steps.append(LayerStep(
                layer, width, config.layer_types[layer], position[sources[layer]],
                slots if own else None, layer in readers,
            ))
            slots += own
        return cls(tuple(steps), name)

    @property
    def cache_kinds(self) -> tuple[str, ...]:
        """The attention type of each cache slot, in slot order."""
        return tuple(s.attention for s in self.steps if s.cache_slot is not None)

    @property
    def last_cache_step(self) -> int:
        """The last step that fills a cache: a prompt chunk whose logits nobody needs stops there."""
        return max(p for p, s in enumerate(self.steps) if s.cache_slot is not None)

    def first_slot(self, attention: str) -> int:
        return self.cache_kinds.index(attention)
