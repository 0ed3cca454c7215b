"""Model configuration: the `glm4_moe` fields of a Hugging Face `config.json`, validated, plus named presets.

Owns the one dataclass every other engine module reads its shapes from. Defaults are those of Hugging Face's
`Glm4MoeConfig`, so a `config.json` that omits a field means what it means to `transformers`. Presets are data
(a dict of field values), not code. Nothing here touches tensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that the engine cannot run; the message names the field and the fix."""


SUPPORTED_MODEL_TYPES = ("glm4_moe",)
SUPPORTED_ACTIVATIONS = ("silu",)
SUPPORTED_ROPE_TYPES = ("default", None)


@dataclass(frozen=True)
class GLMConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads, as in transformers
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    attention_bias: bool = False
    use_qk_norm: bool = False
    moe_intermediate_size: int = 1408
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_routed_experts: int = 128
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 1
    model_type: str = "glm4_moe"
    # Fields we carry but do not interpret (bos/eos ids live in generation_config.json for the engine).
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        self.validate()

    # --- derived shapes -------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layer_ids(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count of the decoding model (MTP layer excluded)."""
        d, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0) + 2 * d
        attn += 2 * hd if self.use_qk_norm else 0
        dense_mlp = 3 * d * self.intermediate_size
        experts = self.num_experts_per_tok if active_only else self.n_routed_experts
        moe = 3 * d * self.moe_intermediate_size * (experts + self.n_shared_experts)
        moe += self.n_routed_experts * d + self.n_routed_experts
        n_moe = len(self.moe_layer_ids)
        n_dense = self.num_hidden_layers - n_moe
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * attn + n_dense * dense_mlp + n_moe * moe + embed + d

    # --- validation -----------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            fail("model_type", f"this engine runs {', '.join(SUPPORTED_MODEL_TYPES)} (GLM-4.5 family) checkpoints only")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            fail("hidden_act", f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "moe_intermediate_size",
                     "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        for name in ("intermediate_size", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "must be a non-negative integer")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", "must be in (0, 1]")
        if self.rotary_dim % 2:
            fail("partial_rotary_factor", f"head_dim * factor = {self.rotary_dim} must be even")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"cannot exceed n_routed_experts ({self.n_routed_experts})")
        if self.n_routed_experts % self.n_group:
            fail("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            fail("topk_group", f"cannot exceed n_group ({self.n_group})")
        experts_per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and experts_per_group < 2:
            fail("n_group", "group-limited routing scores groups by their top-2 experts: need >= 2 experts a group")
        if self.topk_group * experts_per_group < self.num_experts_per_tok:
            fail("topk_group", f"the {self.topk_group} kept group(s) hold fewer than num_experts_per_tok experts")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"cannot exceed num_hidden_layers ({self.num_hidden_layers})")
        if self.first_k_dense_replace > 0 and self.intermediate_size < 1:
            fail("intermediate_size", "dense layers need a positive intermediate_size")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")

    # --- I/O ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GLMConfig:
        raw = dict(raw)
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no 'model_type': expected 'glm4_moe' (a GLM-4.5 family checkpoint)")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"config field 'model_type' = {model_type!r}: this engine runs glm4_moe (GLM-4.5 "
                              "family) checkpoints only")
        # transformers >= 5 nests rope settings under rope_parameters; released GLM checkpoints keep them flat.
        rope = raw.pop("rope_parameters", None) or raw.pop("rope_scaling", None) or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config field 'rope_parameters' = {rope!r}: expected an object")
        if rope.get("rope_type", rope.get("type")) not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"config field 'rope_parameters.rope_type' = {rope.get('rope_type')!r}: only the "
                              "default RoPE is supported")
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope and key not in raw:
                raw[key] = rope[key]
        if "num_mtp_layers" in raw and "num_nextn_predict_layers" not in raw:
            raw["num_nextn_predict_layers"] = raw.pop("num_mtp_layers")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        for key, value in known.items():
            if value is None and key != "head_dim":
                raise ConfigError(f"config field '{key}' is null: give it a value or remove it to use the default")
        try:
            return cls(**known, extra=extra)
        except TypeError as exc:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"config.json: {exc}") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}: point at a Hugging Face checkpoint folder")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GLMConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` of this config (flat rope fields, as GLM checkpoints ship them)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["architectures"] = ["Glm4MoeForCausalLM"]
        return {**self.extra, **out}

    def replace(self, **changes: Any) -> GLMConfig:
        return dataclasses.replace(self, **changes)


# Named presets: field values only. The real models' shapes come from their published config.json files.
PRESETS: dict[str, dict[str, Any]] = {
    "glm-4.5-air": dict(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, attention_bias=True, use_qk_norm=False,
        partial_rotary_factor=0.5, rope_theta=1_000_000.0, rms_norm_eps=1e-5, first_k_dense_replace=1,
        n_routed_experts=128, num_experts_per_tok=8, moe_intermediate_size=1408, n_shared_experts=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        max_position_embeddings=131072, tie_word_embeddings=False, num_nextn_predict_layers=1,
    ),
    "glm-4.5": dict(
        vocab_size=151552, hidden_size=5120, intermediate_size=12288, num_hidden_layers=92,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, attention_bias=True, use_qk_norm=True,
        partial_rotary_factor=0.5, rope_theta=1_000_000.0, rms_norm_eps=1e-5, first_k_dense_replace=3,
        n_routed_experts=160, num_experts_per_tok=8, moe_intermediate_size=1536, n_shared_experts=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=131072, tie_word_embeddings=False, num_nextn_predict_layers=1,
    ),
    # Tiny configs for tests: every structural feature switched on somewhere.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=True, partial_rotary_factor=0.5,
        rope_theta=10000.0, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=1, max_position_embeddings=2048,
    ),
    "tiny-grouped": dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5,
        first_k_dense_replace=0, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=24,
        n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.5,
        max_position_embeddings=2048,
    ),
    # The shape of bench/engine_cpu.py's checkpoint: about 10M parameters.
    "bench-10m": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, attention_bias=True, partial_rotary_factor=0.5,
        first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
        n_shared_experts=1, max_position_embeddings=4096,
    ),
}
