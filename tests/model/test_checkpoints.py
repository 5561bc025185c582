"""Weights: transformers folders round trip; MA-LMM / LAVIS state dicts map onto the same modules, strictly."""

import json

import pytest
import torch
from transformers import InstructBlipForConditionalGeneration

from mixmalmm.model import (
    MALMM,
    CheckpointMismatchError,
    StreamConfig,
    lavis_state_dict,
    load_lavis_checkpoint,
)
from mixmalmm.model.lavis import lavis_to_ours

from .conftest import make_model, random_pixels

QUESTION = "who is there?"


def run(model, pixels):
    state = model.create_state()
    model.register_question(state, QUESTION)
    for t in range(pixels.shape[0]):
        model.step_frame(state, pixels[t], float(t))
    return state.standing[QUESTION].output, model.answer(state, QUESTION, max_new_tokens=5).token_ids


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_pretrained_round_trip(tmp_path):
    model = make_model(2, seed=6)
    model.save_pretrained(tmp_path)
    # The folder is a transformers InstructBLIP folder...
    blip = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True)
    theirs = blip.state_dict()
    for k, v in model.state_dict().items():
        if k != "frame_position.weight":
            assert torch.equal(theirs[k], v), k
    assert json.loads((tmp_path / "malmm_config.json").read_text())["memory_bank_length"] == 2
    # ...that loads back with the frame position table and stream config.
    loaded = MALMM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_weights(model, loaded)
    pixels = random_pixels(4, seed=6)
    out_a, tokens_a = run(model, pixels)
    out_b, tokens_b = run(loaded, pixels)
    assert torch.equal(out_a, out_b) and tokens_a == tokens_b


def test_plain_instructblip_folder_loads_with_zero_positions(tmp_path):
    model = make_model(2, seed=7)
    model.save_pretrained(tmp_path)
    (tmp_path / "malmm.safetensors").unlink()
    (tmp_path / "malmm_config.json").unlink()
    loaded = MALMM.from_pretrained(tmp_path, config=StreamConfig(memory_bank_length=4))
    assert loaded.config.memory_bank_length == 4
    assert torch.count_nonzero(loaded.frame_position.weight) == 0


def test_bad_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        MALMM.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MALMM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="instructblip"):
        MALMM.from_pretrained(tmp_path)


def test_lavis_key_names():
    model = make_model(2)
    sd = lavis_state_dict(model)
    # Names as in MA-LMM's checkpoints and LAVIS's modules.
    facts = {
        "Qformer.bert.encoder.layer.0.attention.self.query.weight": "qformer.encoder.layer.0.attention.attention.query.weight",
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight": "qformer.encoder.layer.0.crossattention.attention.key.weight",
        "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias": "qformer.encoder.layer.1.output_query.LayerNorm.bias",
        "Qformer.bert.embeddings.LayerNorm.weight": "qformer.embeddings.layernorm.weight",
        "query_tokens": "query_tokens",
        "llm_proj.weight": "language_projection.weight",
        "image_pe.weight": "frame_position.weight",
        "ln_vision.weight": "vision_model.post_layernorm.weight",
        "visual_encoder.blocks.1.attn.qkv.weight": "vision_model.encoder.layers.1.self_attn.qkv.weight",
        "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
        "llm_model.lm_head.weight": "language_model.lm_head.weight",
    }
    ours = model.state_dict()
    for lavis, name in facts.items():
        assert torch.equal(sd[lavis], ours[name]), lavis
    qkv = ours["vision_model.encoder.layers.0.self_attn.qkv.bias"]
    C = qkv.shape[0] // 3
    assert torch.equal(sd["visual_encoder.blocks.0.attn.q_bias"], qkv[:C])
    assert torch.equal(sd["visual_encoder.blocks.0.attn.v_bias"], qkv[2 * C :])
    assert not any(k.startswith(("qformer.", "vision_model.", "language_model.")) for k in sd)


def test_lavis_checkpoint_loads_every_tensor(tmp_path):
    source = make_model(2, seed=8)
    target = make_model(2, seed=9)
    # The vision encoder's k bias is fixed at zero in EVA ViT (LAVIS keeps only q_bias and v_bias).
    with torch.no_grad():
        for layer in source.vision_model.encoder.layers:
            C = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[C : 2 * C] = 0
    path = tmp_path / "malmm.pth"
    torch.save({"model": lavis_state_dict(source), "epoch": 3}, path)
    report = load_lavis_checkpoint(target, path)
    assert report.loaded["vision"] > 0 and report.loaded["llm"] > 0 and report.loaded["frame_position"] == 1
    assert_same_weights(source, target)


def test_trimmed_lavis_checkpoint_keeps_frozen_modules(tmp_path):
    """MA-LMM saves only trained weights: Q-Former side, ln_vision, llm_proj, image_pe."""
    source, target = make_model(2, seed=10), make_model(2, seed=11)
    trimmed = lavis_state_dict(source, vision=False, llm=False)
    vision_before = target.vision_model.embeddings.patch_embedding.weight.clone()
    report = load_lavis_checkpoint(target, trimmed)
    assert set(report.loaded) == {"qformer", "frame_position"}
    assert sorted(report.ignored) == sorted(lavis_buffers(source))  # LAVIS's buffers, ignored
    assert torch.equal(target.vision_model.embeddings.patch_embedding.weight, vision_before)
    for name in ("query_tokens", "qformer.encoder.layer.1.attention.attention.value.weight",
                 "language_projection.bias", "vision_model.post_layernorm.weight", "frame_position.weight"):
        assert torch.equal(target.state_dict()[name], source.state_dict()[name]), name


def test_strict_loading_lists_missing_unexpected_and_mismatched_keys():
    model = make_model(2, seed=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = lavis_state_dict(model, vision=False, llm=False)
    del sd["Qformer.bert.encoder.layer.0.attention.self.query.weight"]
    del sd["llm_proj.bias"]
    sd["Qformer.cls.predictions.bias"] = torch.zeros(3)
    sd["t5_proj.weight"] = torch.zeros(3)
    sd["query_tokens"] = torch.zeros(1, 32, 768)
    with pytest.raises(CheckpointMismatchError) as err:
        load_lavis_checkpoint(model, sd)
    message = str(err.value)
    assert "missing keys (2)" in message
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in message and "llm_proj.bias" in message
    assert "unexpected keys (2)" in message and "Qformer.cls.predictions.bias" in message and "t5_proj.weight" in message
    assert "query_tokens (1, 32, 768)" in message
    assert err.value.missing == sorted(["Qformer.bert.encoder.layer.0.attention.self.query.weight", "llm_proj.bias"])
    # Nothing was changed.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_partial_vision_encoder_is_missing_keys():
    model = make_model(2, seed=13)
    sd = lavis_state_dict(model, llm=False)
    del sd["visual_encoder.blocks.0.attn.v_bias"]
    del sd["visual_encoder.blocks.1.mlp.fc2.weight"]
    with pytest.raises(CheckpointMismatchError) as err:
        load_lavis_checkpoint(model, sd)
    assert err.value.missing == ["visual_encoder.blocks.0.attn.v_bias", "visual_encoder.blocks.1.mlp.fc2.weight"]


def test_bad_checkpoint_files(tmp_path):
    model = make_model(2)
    with pytest.raises(FileNotFoundError, match="no LAVIS checkpoint"):
        load_lavis_checkpoint(model, tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_lavis_checkpoint(model, junk)
    other = tmp_path / "other.pth"
    torch.save({"model": "nope"}, other)
    with pytest.raises(ValueError, match="no LAVIS state dict"):
        load_lavis_checkpoint(model, other)


def test_a_lavis_checkpoint_loads_into_a_present_frame_model_and_leaves_its_marker():
    source = MALMM.tiny(StreamConfig(memory_bank_length=2), seed=8)
    target = MALMM.tiny(StreamConfig(memory_bank_length=2, present_frame=True), seed=9)
    with torch.no_grad():
        target.present_embedding.fill_(0.5)
        for layer in source.vision_model.encoder.layers:  # EVA ViT has no k bias (see above)
            C = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[C : 2 * C] = 0
    state = lavis_state_dict(target)
    assert not any("present" in k for k in state)  # LAVIS has no name for it: never exported
    report = load_lavis_checkpoint(target, lavis_state_dict(source))
    assert "present" not in report.loaded
    assert bool((target.present_embedding == 0.5).all())
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


def lavis_buffers(model) -> dict[str, torch.Tensor]:
    """LAVIS's saved buffers, from the configs: BertEmbeddings' position_ids and, in each layer of its
    LLaMA, RotaryEmbedding's inv_freq = 1 / theta^(2i/d)."""
    positions = model.blip_config.qformer_config.max_position_embeddings
    llm = model.language_model.config
    d = llm.hidden_size // llm.num_attention_heads
    inv_freq = 1.0 / (llm.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    out = {"Qformer.bert.embeddings.position_ids": torch.arange(positions)[None]}
    for i in range(llm.num_hidden_layers):
        out[f"llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    return out


@pytest.mark.parametrize("full", [True, False])
def test_lavis_state_dict_holds_lavis_buffers_for_a_strict_load(full):
    model = make_model(2, seed=13)
    sd = lavis_state_dict(model, vision=full, llm=full)
    buffers = lavis_buffers(model)
    weights = set(sd) - set(buffers)
    assert set(buffers) <= set(sd)  # LAVIS keeps buffers of frozen modules too
    for key, value in buffers.items():
        assert sd[key].dtype == value.dtype, key
        torch.testing.assert_close(sd[key], value, rtol=1e-6, atol=0)
    # Everything else is a weight that maps onto one of ours; loading back ignores the buffers.
    assert all(k.endswith(("q_bias", "v_bias")) or lavis_to_ours(k) in model.state_dict() for k in weights)
    report = load_lavis_checkpoint(make_model(2, seed=14), sd)
    assert sorted(report.ignored) == sorted(buffers)


def test_a_lavis_checkpoint_gives_ln_vision_lavis_epsilon(tmp_path):
    source, target = make_model(2, seed=15), make_model(2, seed=16)
    ln = target.vision_model.post_layernorm
    assert ln.eps == target.blip_config.vision_config.layer_norm_eps == 1e-6  # transformers' value
    load_lavis_checkpoint(target, lavis_state_dict(source, vision=False, llm=False))
    assert ln.eps == 1e-5 and target.config.ln_vision_eps == 1e-5
    pixels = random_pixels(2)
    vision = target.vision_model
    with torch.no_grad():
        hidden = vision.encoder(inputs_embeds=vision.embeddings(pixels)).last_hidden_state
    lavis = torch.nn.functional.layer_norm(hidden, ln.normalized_shape, ln.weight, ln.bias, eps=1e-5)
    transformers_eps = torch.nn.functional.layer_norm(hidden, ln.normalized_shape, ln.weight, ln.bias, eps=1e-6)
    assert not torch.equal(lavis, transformers_eps)  # the two epsilons are told apart at this size
    assert torch.equal(target.encode_frames(pixels), lavis)
    target.save_pretrained(tmp_path / "m")  # kept with the model
    assert MALMM.from_pretrained(tmp_path / "m").vision_model.post_layernorm.eps == 1e-5
