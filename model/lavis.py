"""MA-LMM / LAVIS checkpoints onto `MALMM` (transformers' module names).

A LAVIS `.pth` holds {"model": state_dict}. MA-LMM's fine-tuned checkpoints hold only what was trained
(LAVIS drops frozen parameters when saving): `query_tokens`, `ln_vision.*`, `Qformer.bert.*`,
`llm_proj.*`, `image_pe.weight`. Full LAVIS state dicts may also hold `visual_encoder.*` (EVA ViT-g,
whose attention keeps `q_bias` and `v_bias` apart) and `llm_model.*`.

Key mapping (LAVIS -> here):
    query_tokens                                  -> query_tokens
    ln_vision.{weight,bias}                       -> vision_model.post_layernorm.*
    image_pe.weight                               -> frame_position.weight
    llm_proj.*                                    -> language_projection.*
    llm_model.*                                   -> language_model.*
    Qformer.bert.embeddings.LayerNorm.*           -> qformer.embeddings.layernorm.*
    Qformer.bert.embeddings.{word,position}_embeddings.weight -> qformer.embeddings.*
    Qformer.bert.encoder.layer.{i}.{attention,crossattention}.self.* -> qformer.encoder.layer.{i}.*.attention.*
    Qformer.bert.encoder.layer.{i}.<anything else>  -> qformer.encoder.layer.{i}.<same>
    visual_encoder.cls_token / pos_embed / patch_embed.proj.* -> vision_model.embeddings.class_embedding /
        position_embedding / patch_embedding.*
    visual_encoder.blocks.{i}.norm1/norm2/attn.qkv.weight/attn.proj/mlp.fc1/mlp.fc2
        -> vision_model.encoder.layers.{i}.layer_norm1/layer_norm2/self_attn.qkv.weight/self_attn.projection/mlp.*
    visual_encoder.blocks.{i}.attn.{q_bias,v_bias} -> vision_model.encoder.layers.{i}.self_attn.qkv.bias
        (= cat(q_bias, zeros, v_bias))

Buffers: LAVIS saves `Qformer.bert.embeddings.position_ids` ([1, max_position_embeddings], 0..P-1) and,
with its LLaMA, `llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq` (one per layer, the rotary
frequencies); transformers keeps both as non-persistent buffers (the rotary one once per model).
`lavis_state_dict` writes them, so MA-LMM's model loads its output strictly; loading here ignores them
(they are functions of the config, not weights).

ln_vision's epsilon: LAVIS's is 1e-5, transformers' post_layernorm takes 1e-6 from the vision config;
a checkpoint holding `ln_vision.*` sets the model's to 1e-5 (`StreamConfig.ln_vision_eps`, saved with it).

Loading is strict: every key must map to a parameter of the model with the same shape, and every group
present must be complete (the Q-Former side always; the vision encoder and the LLM when any of their
keys is present). The error lists all missing, unexpected and mismatched keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .malmm import LAVIS_LN_VISION_EPS

# Buffers that LAVIS/old transformers saved but that carry no weights.
IGNORED = (re.compile(r"^Qformer\.bert\.embeddings\.position_ids$"), re.compile(r"\.rotary_emb\.inv_freq$"))

_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VISION_TOP = {
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
}
_QFORMER_EMB = {
    "Qformer.bert.embeddings.LayerNorm.weight": "qformer.embeddings.layernorm.weight",
    "Qformer.bert.embeddings.LayerNorm.bias": "qformer.embeddings.layernorm.bias",
    "Qformer.bert.embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "qformer.embeddings.position_embeddings.weight",
}
_SIMPLE = {
    "query_tokens": "query_tokens",
    "ln_vision.weight": "vision_model.post_layernorm.weight",
    "ln_vision.bias": "vision_model.post_layernorm.bias",
    "image_pe.weight": "frame_position.weight",
    "llm_proj.weight": "language_projection.weight",
    "llm_proj.bias": "language_projection.bias",
    **_QFORMER_EMB,
    **_VISION_TOP,
}
_SIMPLE_INV = {v: k for k, v in _SIMPLE.items()}
_BLOCK_RE = re.compile(r"^visual_encoder\.blocks\.(\d+)\.(.+)$")
_QLAYER_RE = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$")
_QKV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias$")


def lavis_to_ours(key: str) -> str | None:
    """Our parameter name for a LAVIS key (None for q_bias/v_bias, which combine, and unknown keys)."""
    if key in _SIMPLE:
        return _SIMPLE[key]
    if key.startswith("llm_model."):
        return "language_model." + key[len("llm_model.") :]
    m = _QLAYER_RE.match(key)
    if m:
        rest = m.group(2).replace("attention.self.", "attention.attention.")
        return f"qformer.encoder.layer.{m.group(1)}.{rest}"
    m = _BLOCK_RE.match(key)
    if m:
        for src, dst in _VISION_BLOCK.items():
            if m.group(2) == src or m.group(2).startswith(src + "."):
                return f"vision_model.encoder.layers.{m.group(1)}.{dst}{m.group(2)[len(src):]}"
    return None


def ours_to_lavis(key: str) -> str | None:
    """The LAVIS key of one of our parameters (None for qkv.bias, which splits into q_bias and v_bias)."""
    if key in _SIMPLE_INV:
        return _SIMPLE_INV[key]
    if key.startswith("language_model."):
        return "llm_model." + key[len("language_model.") :]
    m = re.match(r"^qformer\.encoder\.layer\.(\d+)\.(.+)$", key)
    if m:
        rest = m.group(2).replace("attention.attention.", "attention.self.")
        return f"Qformer.bert.encoder.layer.{m.group(1)}.{rest}"
    m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$", key)
    if m:
        if m.group(2) == "self_attn.qkv.bias":
            return None
        for src, dst in _VISION_BLOCK.items():
            if m.group(2) == dst or m.group(2).startswith(dst + "."):
                return f"visual_encoder.blocks.{m.group(1)}.{src}{m.group(2)[len(dst):]}"
    return None


def _group(our_key: str) -> str:
    if our_key.startswith("vision_model.") and not our_key.startswith("vision_model.post_layernorm."):
        return "vision"
    if our_key.startswith("language_model."):
        return "llm"
    if our_key == "frame_position.weight":
        return "frame_position"
    if our_key == "present_embedding":
        return "present"  # mixmalmm's present-frame marker: MA-LMM has none, LAVIS never holds it
    return "qformer"  # query tokens, ln_vision, Q-Former, projection: always required


def lavis_state_dict(model, *, vision: bool = True, llm: bool = True) -> dict[str, torch.Tensor]:
    """Our weights under LAVIS names (the inverse mapping): what an MA-LMM checkpoint's "model" holds,
    with LAVIS's saved buffers (the Q-Former's position_ids; a LLaMA's per-layer rotary inv_freq, with
    or without `llm`). vision / llm: include those modules' weights (MA-LMM's checkpoints do not)."""
    out: dict[str, torch.Tensor] = {}
    position_ids = getattr(model.qformer.embeddings, "position_ids", None)
    if position_ids is not None:
        out["Qformer.bert.embeddings.position_ids"] = position_ids.detach().clone()
    rotary = getattr(getattr(model.language_model, "model", None), "rotary_emb", None)
    # LAVIS drops frozen parameters when saving, never buffers: a frozen LLaMA's stay. Its copy keeps
    # one per attention layer.
    if rotary is not None:
        for i in range(model.language_model.config.num_hidden_layers):
            out[f"llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = rotary.inv_freq.detach().clone()
    for key, value in model.state_dict().items():
        group = _group(key)
        if (group == "vision" and not vision) or (group == "llm" and not llm) or group == "present":
            continue
        if key.endswith("self_attn.qkv.bias") and key.startswith("vision_model."):
            i = key.split(".")[3]
            C = value.shape[0] // 3
            out[f"visual_encoder.blocks.{i}.attn.q_bias"] = value[:C].clone()
            out[f"visual_encoder.blocks.{i}.attn.v_bias"] = value[2 * C :].clone()
            continue
        name = ours_to_lavis(key)
        if name is None:
            raise KeyError(f"no LAVIS name for parameter {key!r}")
        out[name] = value.detach().clone()
    return out


@dataclass
class LavisLoadReport:
    """What a LAVIS checkpoint replaced: keys per group ("qformer", "vision", "llm", "frame_position")."""

    loaded: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; lists missing, unexpected and mismatched keys."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [f"checkpoint {source} does not fit the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {', '.join(mismatched)}")
        super().__init__("\n".join(parts))


def read_lavis_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The "model" state dict of a LAVIS .pth (read with weights_only: nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LAVIS checkpoint at '{path}'")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a non-checkpoint file
        raise ValueError(f"'{path}' is not a readable torch checkpoint (weights only): {err}") from err
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise ValueError(f"'{path}' holds no LAVIS state dict (expected {{'model': {{name: tensor}}}})")


@torch.no_grad()
def load_lavis_checkpoint(model, source: str | Path | dict[str, torch.Tensor]) -> LavisLoadReport:
    """Load an MA-LMM / LAVIS checkpoint (path or state dict) into a `MALMM`, strictly.

    Raises CheckpointMismatchError (listing missing, unexpected and mismatched keys) before changing
    any weight when the checkpoint does not fit.
    """
    name = f"'{source}'" if not isinstance(source, dict) else "(state dict)"
    sd = read_lavis_checkpoint(source) if not isinstance(source, dict) else source
    params = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected, ignored, mismatched = [], [], []
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if any(p.search(key) for p in IGNORED):
            ignored.append(key)
            continue
        m = _QKV_BIAS.match(key)
        if m:
            qkv.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        ours = lavis_to_ours(key)
        if ours is None or ours not in params:
            unexpected.append(key)
            continue
        mapped[ours] = value
    missing = []
    for i, parts in qkv.items():
        ours = f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"
        if ours not in params:
            unexpected.extend(f"visual_encoder.blocks.{i}.attn.{p}_bias" for p in parts)
            continue
        if set(parts) != {"q", "v"}:
            missing.extend(f"visual_encoder.blocks.{i}.attn.{p}_bias" for p in "qv" if p not in parts)
            continue
        mapped[ours] = torch.cat([parts["q"], torch.zeros_like(parts["v"]), parts["v"]])
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(params[key].shape):
            mismatched.append(f"{ours_to_lavis(key) or key} {tuple(value.shape)} vs model {tuple(params[key].shape)}")
    present = {_group(k) for k in mapped}
    required = {"qformer"} | (present & {"vision", "llm"})
    tied = _tied_keys(model)
    for key in params:
        group = _group(key)
        if group in required and key not in mapped and key not in tied:
            lavis = ours_to_lavis(key)
            if lavis is None:  # a fused qkv bias: name the halves the checkpoint lacks
                i = key.split(".")[3]
                missing.extend(f"visual_encoder.blocks.{i}.attn.{p}_bias" for p in "qv" if p not in qkv.get(i, {}))
            else:
                missing.append(lavis)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(name, sorted(set(missing)), sorted(unexpected), mismatched)
    for key, value in mapped.items():
        params[key].copy_(value.to(params[key].dtype))
    if "vision_model.post_layernorm.weight" in mapped:  # LAVIS's ln_vision: nn.LayerNorm's eps
        model.config = replace(model.config, ln_vision_eps=LAVIS_LN_VISION_EPS)
        model.vision_model.post_layernorm.eps = LAVIS_LN_VISION_EPS
    report = LavisLoadReport(ignored=ignored)
    for key in mapped:
        report.loaded[_group(key)] = report.loaded.get(_group(key), 0) + 1
    return report


def _tied_keys(model) -> set[str]:
    """Parameter names that share storage with an earlier one (tied LLM embeddings): not required."""
    seen: dict[int, str] = {}
    tied = set()
    for key, value in model.state_dict(keep_vars=True).items():
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            tied.add(key)
        else:
            seen[ptr] = key
    return tied
