"""GGUF in and out (workbench.engine.gguf_file, gguf_export): the bundled model and tiny models built in code,
exported and imported back: logits (F32 exactly; Q8_0/Q4_K equal to the engine on gguf's dequantized values), the
config the metadata describes, the tokenizer against the HF one, split files, the MTP layer, the name table
against gguf's own, the CLI, and every kind of bad file."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from glm_kernels.blockquant import dequantize
from safetensors.torch import load_file, save_file

import workbench.chat  # noqa: F401  (gives the engine's Tokenizer apply_chat_template)
from workbench.engine import Engine, GLMConfig, gguf_blocks
from workbench.engine.gguf_export import export_gguf, tensor_type
from workbench.engine.gguf_file import (
    EXPERT_NAMES,
    GLM4_PRETOKENIZER_REGEX,
    GLOBAL_NAMES,
    LAYER_NAMES,
    NEXTN_NAMES,
    GGUFError,
    config_from_gguf,
    open_gguf,
    tokenizer_from_gguf,
)
from workbench.engine.model import GLMForCausalLM
from workbench.engine.testing import GLM_SPECIAL_TOKENS, measure_load_memory, write_tiny_checkpoint
from workbench.engine.tokenizer import Tokenizer
from workbench.models import default_model_path

BUNDLED = default_model_path()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
TEXTS = [
    "Hello world!", "def fizzbuzz(n):\n\tfor i in range(1, n + 1):\n\n\n        print(i)  # 15 % 3 == 0\n",
    "Привет, мир! 你好，世界。 1234567 3.14159 ４２", "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "emoji 🦙🚀 😶\u200d🌫️  \n  \r\n trailing   ", " leading space", "\n\n", "",
    "[gMASK]<sop><|system|>\nYou are a helper<|user|>\nhi<|assistant|>\n<think>hmm</think>\nok /nothink",
    '<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call><|observation|>',
    "text with <|user" + "|> split and <think without close",
]


def engine(path, **kwargs) -> Engine:
    return Engine.from_pretrained(path, dtype="float32", kernels="torch", cpu_kernels="torch", **kwargs)


@pytest.fixture(scope="module")
def bundled_ggufs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundled-gguf")
    return {t: export_gguf(BUNDLED, folder / f"mini-{t}.gguf", t)[0] for t in ("f32", "q8_0", "q4_k")}


@pytest.fixture(scope="module")
def bundled_engine() -> Engine:
    return engine(BUNDLED)


@pytest.fixture(scope="module")
def prompt(bundled_engine) -> list[int]:
    return bundled_engine.tokenizer.encode("def fizzbuzz(n):\n    for i in range(1, n + 1):\n        if i % 15")


# --- round trips ----------------------------------------------------------------------------------------------
def test_bundled_f32_round_trip_gives_the_checkpoints_logits_exactly(bundled_ggufs, bundled_engine, prompt):
    loaded = engine(bundled_ggufs["f32"])
    assert loaded.config == bundled_engine.config
    assert torch.equal(loaded.logits(prompt), bundled_engine.logits(prompt))
    ours = loaded.generate(prompt, max_new_tokens=12, temperature=0.0).token_ids
    assert ours == bundled_engine.generate(prompt, max_new_tokens=12, temperature=0.0).token_ids
    assert loaded.name == "mini-f32"


def dequantized_reference(gguf_path: Path, folder: Path) -> Path:
    """A checkpoint folder of the bundled model's config and tokenizer whose weights are gguf's own dequantized
    values of every tensor in `gguf_path` (the reference a quantized import must reproduce)."""
    folder.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(BUNDLED / name, folder / name)
    reader = gguf.GGUFReader(gguf_path)
    tensors = {}
    for t in reader.tensors:
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if t.name in GLOBAL_NAMES:
            tensors[GLOBAL_NAMES[t.name]] = values
            continue
        _, layer, rest = t.name.split(".", 2)
        if rest in EXPERT_NAMES:
            for e in range(values.shape[0]):
                tensors[f"model.layers.{layer}.mlp.experts.{e}.{EXPERT_NAMES[rest]}.weight"] = values[e].clone()
        else:
            tensors[f"model.layers.{layer}.{LAYER_NAMES[rest]}"] = values
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(("gguf_type", "types"), [("q8_0", {"Q8_0", "F32"}), ("q4_k", {"Q4_K", "Q5_0", "Q8_0", "F32"})])
def test_bundled_quantized_round_trip_equals_the_engine_on_dequantized_weights(bundled_ggufs, gguf_type, types,
                                                                               bundled_engine, prompt, tmp_path):
    path = bundled_ggufs[gguf_type]
    reader = gguf.GGUFReader(path)
    assert {t.tensor_type.name for t in reader.tensors} == types
    loaded = engine(path)
    # the weights the engine holds are gguf's values bit for bit (packed or dense, whichever builder ran)
    expected = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors
                if t.name in ("blk.1.ffn_down_exps.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight")}
    experts = loaded.model.layers[1].mlp.experts  # Int8Weight / Int4Weight kept packed
    # named by the format most of its bytes are in; a q4_k export mixes formats (Q8_0 output, Q5_0 fallbacks)
    weights = loaded.weights
    if gguf_type == "q4_k":
        assert set(weights["format_bytes"]) == {"int4", "int8"}
        assert weights["format"] == max(weights["format_bytes"], key=weights["format_bytes"].get)
    else:
        assert weights["format"] == "int8" and "format_bytes" not in weights
    down, gate_up = dequantize(experts.down), dequantize(experts.gate_up)
    assert np.array_equal(down.detach().numpy(), expected["blk.1.ffn_down_exps.weight"])
    assert np.array_equal(gate_up.detach().numpy(), np.concatenate(
        [expected["blk.1.ffn_gate_exps.weight"], expected["blk.1.ffn_up_exps.weight"]], axis=1))
    # and it computes what the engine computes on those values, dense: to the rounding of its integer kernels
    # (activations quantized in blocks of 32)
    reference = engine(dequantized_reference(path, tmp_path / "reference"))
    logits, expected_logits = loaded.logits(prompt), reference.logits(prompt)
    spread = float(expected_logits.max() - expected_logits.min())
    assert float((logits - expected_logits).abs().max()) <= 0.02 * spread
    assert (logits.argmax(-1) == expected_logits.argmax(-1)).float().mean().item() >= 0.9
    # the quantization is real but mild: the checkpoint's top token is still on top at most positions
    original = bundled_engine.logits(prompt)
    assert not torch.equal(logits, original)
    agree = (logits.argmax(-1) == original.argmax(-1)).float().mean().item()
    assert agree >= (0.9 if gguf_type == "q8_0" else 0.6), agree


def test_dequantizing_path_for_gpus_gives_the_dequantized_reference_exactly(bundled_ggufs, prompt, tmp_path):
    """Where no integer kernels run (GPUs), quantized weights are dequantized as they load: the same logits as
    the engine on gguf's dequantized values, exactly (run here on the CPU)."""
    from workbench.engine.gguf_file import build_dequantized_model, hf_tensors

    path = bundled_ggufs["q4_k"]
    model_file = open_gguf(path)
    config = config_from_gguf(model_file)
    model = build_dequantized_model(config, hf_tensors(model_file, config), torch.float32, torch.device("cpu"), path)
    loaded = Engine(model, tokenizer_from_gguf(model_file), device=torch.device("cpu"), dtype=torch.float32,
                    kernels="torch", cpu_kernels="torch")
    reference = engine(dequantized_reference(path, tmp_path / "reference"))
    assert torch.equal(loaded.logits(prompt), reference.logits(prompt))


def random_k_blocks(qtype: T, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Valid random Q6_K / Q5_K bytes (we write neither): random quants and sub-scales, small finite fp16 scales."""
    rng = np.random.default_rng(seed)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block, block_bytes), dtype=np.uint8)
    for offset in {T.Q6_K: [208], T.Q5_K: [0, 2]}[qtype]:
        raw[..., offset:offset + 2] = rng.uniform(1e-5, 4e-5, size=raw.shape[:-1]).astype(np.float16)[..., None].view(
            np.uint8)
    return raw.reshape(*shape[:-1], -1)


def test_every_block_type_imports_through_the_engine(tmp_path, prompt, monkeypatch):
    """A GGUF of the bundled model whose matrices take every type the engine reads (Q6_K as int8 in groups of
    16, Q4_0/Q5_0/Q8_0 as int8, Q4_K as int4, BF16/F16 dense, Q5_K dequantized; Q6_K/Q5_K from random blocks, the
    others from gguf's quantizers and ours): the engine holds gguf's values and computes with them."""
    from workbench.engine import gguf_export

    experts = {1: (T.Q6_K, T.Q4_0), 2: (T.Q4_K, T.Q5_0), 3: (T.Q5_K, T.Q8_0), 4: (T.BF16, T.F16)}
    cycle = [T.Q6_K, T.Q4_0, T.Q5_K, T.BF16, T.Q5_0, T.Q4_K, T.F16, T.Q8_0]
    chosen: dict[str, T] = {}

    def tensor_type(name, shape, gguf_type):
        if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
            return T.F32
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if "_exps." in name:
            qtype = experts[layer][1 if "down" in name else 0]
        else:
            qtype = cycle[len(chosen) % len(cycle)]
            if shape[-1] % 256 and qtype in (T.Q6_K, T.Q5_K, T.Q4_K):
                qtype = T.Q4_0
        chosen[name] = qtype
        return qtype

    def encode(values, qtype):
        if qtype in (T.Q6_K, T.Q5_K):
            return random_k_blocks(qtype, tuple(values.shape), seed=len(chosen))
        if qtype == T.Q4_K:
            return gguf_blocks.encode_q4_k(values)
        return gguf.quants.quantize(values.float().numpy(), qtype)

    monkeypatch.setattr(gguf_export, "tensor_type", tensor_type)
    monkeypatch.setattr(gguf_export, "_encode", encode)
    path = export_gguf(BUNDLED, tmp_path / "mixed.gguf", "f32")[0]
    assert set(chosen.values()) == set(cycle)
    loaded = engine(path)
    values = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    for layer in (1, 2):  # exact imports are kept packed, with gguf's values
        held = loaded.model.layers[layer].mlp.experts
        assert np.array_equal(dequantize(held.down).numpy(), values[f"blk.{layer}.ffn_down_exps.weight"])
        assert np.array_equal(dequantize(held.gate_up).numpy(), np.concatenate(
            [values[f"blk.{layer}.ffn_gate_exps.weight"], values[f"blk.{layer}.ffn_up_exps.weight"]], axis=1))
    assert loaded.model.layers[1].mlp.experts.gate_up.group == 16  # Q6_K's sub-blocks
    reference = engine(dequantized_reference(path, tmp_path / "reference"))
    logits, expected = loaded.logits(prompt), reference.logits(prompt)
    assert float((logits - expected).abs().max()) <= 0.02 * float(expected.max() - expected.min())


@pytest.mark.parametrize(("preset", "overrides"), [("tiny", {}), ("tiny-grouped", {}),
                                                   ("tiny", {"tie_word_embeddings": True})])
def test_tiny_models_round_trip_config_and_logits(preset, overrides, tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", preset, seed=3, **overrides)
    path = export_gguf(checkpoint, tmp_path / "tiny.gguf", "f32")[0]
    config = GLMConfig.from_json(checkpoint)
    # the engine's checkpoints hold no MTP layer, so the GGUF announces none (see gguf_export)
    assert config_from_gguf(open_gguf(path)) == config.replace(num_nextn_predict_layers=0)
    assert ("output.weight" in open_gguf(path).tensors) == (not config.tie_word_embeddings)
    ids = list(range(5, 40))
    assert torch.equal(engine(path).logits(ids), engine(checkpoint).logits(ids))


def test_metadata_config_equals_the_hf_config_field_by_field(bundled_ggufs):
    from_gguf = config_from_gguf(open_gguf(bundled_ggufs["q4_k"]))
    hf = GLMConfig.from_json(BUNDLED)
    fields = [f.name for f in dataclasses.fields(GLMConfig) if f.name != "extra"]
    assert {f: getattr(from_gguf, f) for f in fields} == {f: getattr(hf, f) for f in fields}
    assert from_gguf == hf


def test_mtp_layer_is_exported_and_skipped_on_import(tmp_path):
    """A checkpoint holding GLM-4.5's multi-token-prediction layer (model.layers.{N}: a full MoE layer plus
    eh_proj, enorm, hnorm, shared_head): written as llama.cpp's converter writes it, skipped when loading."""
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", "tiny", seed=1)
    config = json.loads((checkpoint / "config.json").read_text())
    n = config["num_hidden_layers"]
    tensors = load_file(str(checkpoint / "model.safetensors"))
    last = f"model.layers.{n - 1}."
    for name, value in list(tensors.items()):
        if name.startswith(last):
            tensors[name.replace(last, f"model.layers.{n}.")] = value.clone() + 0.5
    d = config["hidden_size"]
    for name, shape in {"eh_proj.weight": (d, 2 * d), "enorm.weight": (d,), "hnorm.weight": (d,),
                        "shared_head.norm.weight": (d,)}.items():
        tensors[f"model.layers.{n}.{name}"] = torch.randn(shape)
    save_file(tensors, str(checkpoint / "model.safetensors"))
    assert config["num_nextn_predict_layers"] == 1
    path = export_gguf(checkpoint, tmp_path / "mtp.gguf", "f16")[0]
    model = open_gguf(path)
    assert model.get("glm4moe.block_count") == n + 1 and model.get("glm4moe.nextn_predict_layers") == 1
    written = {f"blk.{n}.nextn.{name}.weight" for name in ("eh_proj", "enorm", "hnorm", "shared_head_norm")}
    assert written <= model.tensors.keys()
    assert f"blk.{n}.ffn_gate_exps.weight" in model.tensors
    loaded = config_from_gguf(model)
    assert loaded.num_hidden_layers == n and loaded.num_nextn_predict_layers == 1
    ids = list(range(3, 30))
    torch.testing.assert_close(engine(path).logits(ids), engine(checkpoint).logits(ids), rtol=0, atol=0.05)


def test_split_files_load_from_any_part_or_their_folder(tmp_path, tiny_checkpoint):
    single = export_gguf(tiny_checkpoint, tmp_path / "one" / "tiny.gguf", "f32")[0]
    files = export_gguf(tiny_checkpoint, tmp_path / "split" / "tiny.gguf", "f32",
                        split_max_bytes=single.stat().st_size // 3)
    assert len(files) >= 3 and [f.name for f in files] == [f"tiny-{i:05d}-of-{len(files):05d}.gguf"
                                                          for i in range(1, len(files) + 1)]
    ids = list(range(7, 30))
    expected = engine(single).logits(ids)
    for path in (files[0], files[1], tmp_path / "split"):
        split = engine(path)
        assert split.name == "tiny" and torch.equal(split.logits(ids), expected)
    files[-1].unlink()
    with pytest.raises(GGUFError, match=rf"{files[-1].name} is missing"):
        engine(files[0])


def test_folder_holding_one_gguf_loads_and_two_are_refused(tmp_path, tiny_checkpoint):
    path = export_gguf(tiny_checkpoint, tmp_path / "models" / "a.gguf", "f16")[0]
    assert engine(tmp_path / "models").name == "a"
    shutil.copy(path, tmp_path / "models" / "b.gguf")
    with pytest.raises(GGUFError, match=r"several GGUF models \(a.gguf, b.gguf\)"):
        engine(tmp_path / "models")


@pytest.mark.parametrize("cache", ["on", "off"])
def test_float_tensors_are_views_of_the_mapped_file(bundled_ggufs, cache, tmp_path):
    """In place, not copied: views of the repack cache's mapping (the default), or of the GGUF's own without it."""
    from workbench.engine import gguf_cache

    path = bundled_ggufs["f32"]
    folder = tmp_path / "cache" if cache == "on" else "off"
    loaded = engine(path, gguf_cache=folder)
    mapped = gguf_cache.cache_path(folder, [path], "mini-f32") if cache == "on" else path
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    ranges = [tuple(int(x, 16) for x in fields[0].split("-")) for fields in maps
              if fields[-1] == str(mapped.resolve())]
    assert ranges
    weight = loaded.model.embed_tokens.weight
    assert any(lo <= weight.data_ptr() < hi for lo, hi in ranges)
    if cache == "on":  # the routed experts too (fp32 here, the engine's dtype: stored as they are)
        experts = loaded.model.layers[1].mlp.experts.gate_up_proj
        assert any(lo <= experts.data_ptr() < hi for lo, hi in ranges)


def test_metadata_reads_as_ggufs_own_reader(bundled_ggufs):
    """Our reader parses arrays in one pass (gguf's takes a minute on GLM-4.5's vocabulary): same values."""
    ours = open_gguf(bundled_ggufs["q4_k"]).readers[0]
    theirs = gguf.GGUFReader(bundled_ggufs["q4_k"])
    assert ours.fields.keys() == theirs.fields.keys()
    for key, field in theirs.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == \
        [(t.name, t.data_offset, t.n_bytes) for t in theirs.tensors]


# --- tokenizer -------------------------------------------------------------------------------------------------
def check_same_tokenizer(ours: Tokenizer, hf: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        ids = hf.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        assert ours.encode_text(text) == hf.encode_text(text), text
    assert ours.stop_token_ids == hf.stop_token_ids
    assert ours.special_tokens == hf.special_tokens
    assert ours.added_tokens == hf.added_tokens
    assert ours.vocab_size == hf.vocab_size


def test_tokenizer_from_gguf_matches_the_bundled_hf_tokenizer(bundled_ggufs, check_chat_fixtures):
    ours = tokenizer_from_gguf(open_gguf(bundled_ggufs["q8_0"]))
    hf = Tokenizer.from_pretrained(BUNDLED)
    assert ours.chat_template == hf.chat_template
    rendered = check_chat_fixtures(ours)  # the GGUF's chat template renders every fixture byte for byte
    check_same_tokenizer(ours, hf, TEXTS + rendered + GLM_SPECIAL_TOKENS + ["".join(GLM_SPECIAL_TOKENS)])
    messages = [{"role": "user", "content": "say <|assistant|> and </think>"}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages)


def test_glm45_pre_tokenizer_round_trips(tmp_path):
    """A tokenizer.json with GLM-4.5's own split (digits in threes, case-insensitive contractions, punctuation
    runs with their newlines) is written as pre-type 'glm4' and rebuilt with the same split."""
    folder = tmp_path / "glm45-split"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        (folder / name).symlink_to(BUNDLED / name) if name != "tokenizer.json" else None
    data = json.loads((BUNDLED / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GLM4_PRETOKENIZER_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    path = export_gguf(folder, tmp_path / "glm45.gguf", "q8_0")[0]
    model = open_gguf(path)
    assert model.get("tokenizer.ggml.pre") == "glm4"
    hf = Tokenizer.from_pretrained(folder)
    texts = TEXTS + ["I'VE 1234567890 a!!!\n\nb", "x\r\n\r\n  y"]
    assert any(hf.encode(t) != Tokenizer.from_pretrained(BUNDLED).encode(t) for t in texts)  # the splits differ
    check_same_tokenizer(tokenizer_from_gguf(model), hf, texts)
    assert open_gguf(export_gguf(BUNDLED, tmp_path / "plain.gguf", "q8_0")[0]).get("tokenizer.ggml.pre") == "gpt-2"


def test_added_tokens_after_the_vocab_and_padding_ids(tmp_path):
    """GLM-4.5's layout: the special tokens get ids after the BPE vocabulary (not in it), and the model's vocab_size
    leaves ids no token has ([PAD...] in the GGUF, type UNUSED, as the converter writes them)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from workbench.engine.testing import _TRAINING_TEXT, write_tokenizer_files

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([_TRAINING_TEXT] * 4, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens(GLM_SPECIAL_TOKENS)
    assert bpe.token_to_id("<|endoftext|>") >= 300  # after the vocabulary
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", "tiny", seed=2)  # vocab_size 512
    write_tokenizer_files(checkpoint, bpe)
    model = open_gguf(export_gguf(checkpoint, tmp_path / "t.gguf", "f16")[0])
    tokens, types = model.get("tokenizer.ggml.tokens"), model.get("tokenizer.ggml.token_type")
    assert len(tokens) == 512 and tokens[-1] == "[PAD511]" and types[-1] == gguf.TokenType.UNUSED
    check_same_tokenizer(tokenizer_from_gguf(model), Tokenizer.from_pretrained(checkpoint), TEXTS)


def test_gguf_tokenizer_metadata_is_the_converters(bundled_ggufs):
    model = open_gguf(bundled_ggufs["f32"])
    tokens = model.get("tokenizer.ggml.tokens")
    assert model.get("tokenizer.ggml.model") == "gpt2" and len(tokens) == 4096
    ids = {key: model.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "eot", "eom", "unknown")}
    assert {key: tokens[i] for key, i in ids.items()} == {
        "bos": "[gMASK]", "eos": "<|endoftext|>", "eot": "<|user|>", "eom": "<|observation|>",
        "unknown": "<|endoftext|>"}
    types = model.get("tokenizer.ggml.token_type")
    assert types[tokens.index("<|assistant|>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("Ġthe")] == gguf.TokenType.NORMAL


# --- names and types ---------------------------------------------------------------------------------------------
def test_name_table_is_ggufs_own():
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4_MOE, 4)
    pairs = [(hf, g) for g, hf in GLOBAL_NAMES.items()]
    pairs += [(f"model.layers.2.{hf}", f"blk.2.{g}") for g, hf in {**LAYER_NAMES, **NEXTN_NAMES}.items()]
    pairs += [(f"model.layers.2.mlp.experts.{hf}.weight", f"blk.2.{g}") for g, hf in EXPERT_NAMES.items()]
    for hf, ours in pairs:
        # the converter turns e_score_correction_bias into e_score_correction.bias before mapping
        hf = hf.replace("e_score_correction_bias", "e_score_correction.bias")
        assert tensor_map.get_name(hf, try_suffixes=(".weight", ".bias")) == ours, hf


@pytest.mark.parametrize(("name", "shape", "gguf_type", "expected"), [
    ("blk.1.attn_norm.weight", (256,), "q4_k", T.F32),
    ("blk.1.exp_probs_b.bias", (16,), "q8_0", T.F32),
    ("blk.1.ffn_gate_inp.weight", (16, 256), "q4_k", T.F32),
    ("blk.1.ffn_up_exps.weight", (16, 128, 256), "f16", T.F16),
    ("blk.1.ffn_up_exps.weight", (16, 128, 256), "q4_k", T.Q4_K),
    ("blk.1.ffn_down_exps.weight", (16, 256, 128), "q4_k", T.Q5_0),  # llama.cpp's fallback for rows % 256
    ("blk.1.ffn_down_exps.weight", (16, 64, 24), "q4_k", T.F16),  # nor a multiple of 32
    ("blk.1.ffn_down_exps.weight", (16, 64, 24), "q8_0", T.F16),
    ("blk.1.attn_q.weight", (256, 256), "q8_0", T.Q8_0),
    ("output.weight", (4096, 256), "q4_k", T.Q8_0),
    ("token_embd.weight", (4096, 256), "q4_k", T.Q4_K),
    ("token_embd.weight", (4096, 256), "f32", T.F32),
])
def test_export_tensor_types(name, shape, gguf_type, expected):
    assert tensor_type(name, shape, gguf_type) == expected


# --- the command line ------------------------------------------------------------------------------------------
def test_cli_export_gguf(tmp_path, tiny_checkpoint, capsys):
    from workbench.cli import main

    out = tmp_path / "tiny-q8.gguf"
    assert main(["export-gguf", str(tiny_checkpoint), str(out), "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert engine(out).config == GLMConfig.from_json(tiny_checkpoint).replace(num_nextn_predict_layers=0)
    # the tiny checkpoint's tokenizer carries GLM-4.5's template: the CLI writes it
    from workbench.chat.template import GLM45_CHAT_TEMPLATE

    assert open_gguf(out).get("tokenizer.chat_template") == GLM45_CHAT_TEMPLATE
    # the library call writes the checkpoint tokenizer's template (a tiny checkpoint writes GLM-4.5's)
    plain = export_gguf(tiny_checkpoint, tmp_path / "plain.gguf", "f16")[0]
    assert open_gguf(plain).get("tokenizer.chat_template") == GLM45_CHAT_TEMPLATE
    assert tokenizer_from_gguf(open_gguf(plain)).chat_template == GLM45_CHAT_TEMPLATE
    assert main(["export-gguf", str(tmp_path / "nowhere"), str(out)]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export-gguf", str(tiny_checkpoint), str(out), "--type", "q2_k"])


# --- bad input ----------------------------------------------------------------------------------------------------
def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, T | None]]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def glm_models_alive() -> int:
    gc.collect()
    return sum(type(o) is GLMForCausalLM for o in gc.get_objects())


def test_gguf_of_another_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", "llama", {"token_embd.weight": (np.zeros((8, 4), np.float32), None)})
    with pytest.raises(GGUFError, match=r"architecture 'llama'.*'glm4moe'"):
        engine(path)


def test_unsupported_tensor_type_names_it_and_the_supported_ones(tmp_path):
    path = write_gguf(tmp_path / "iq.gguf", "glm4moe", {
        "token_embd.weight": (np.zeros((8, 66), np.uint8), T.IQ2_XXS)})
    with pytest.raises(GGUFError, match=r"'token_embd.weight' is of GGML type IQ2_XXS.*supported: F32, F16, BF16, "
                                        r"Q8_0, Q4_0, Q5_0, Q6_K, Q4_K, Q5_K"):
        engine(path)


def test_truncated_file_names_the_tensor_and_the_missing_bytes(bundled_ggufs, tmp_path):
    source = bundled_ggufs["q8_0"]
    last = max(gguf.GGUFReader(source).tensors, key=lambda t: t.data_offset)
    data = source.read_bytes()
    cut = last.data_offset + int(last.n_bytes) - 1000
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    before = glm_models_alive()
    with pytest.raises(GGUFError, match=rf"truncated: tensor '{last.name}' .* 1000 bytes are missing"):
        engine(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:5000])  # inside the token list
    with pytest.raises(GGUFError, match="truncated or corrupt in its header"):
        engine(tmp_path / "header.gguf")
    assert glm_models_alive() == before


def test_files_that_are_not_gguf(tmp_path):
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(GGUFError, match=r"notes.gguf is not a GGUF file \(it starts with b'not '"):
        engine(tmp_path / "notes.gguf")
    with pytest.raises(Exception, match="is a file: point at the checkpoint folder"):
        engine(BUNDLED / "model.safetensors")  # a safetensors file stays what it was: not GGUF


@pytest.mark.parametrize("cache", ["on", "off"])
def test_a_failure_while_reading_weights_leaves_nothing_loaded(bundled_ggufs, monkeypatch, cache, tmp_path):
    """Nothing in memory, and (repacking) no cache file, complete or partial, left behind."""
    from workbench.engine import gguf_blocks

    calls = {"n": 0}
    decode = gguf_blocks.decode

    def failing(raw, qtype):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk read error")
        return decode(raw, qtype)

    monkeypatch.setattr(gguf_blocks, "decode", failing)
    before = glm_models_alive()
    with pytest.raises(OSError, match="disk read error"):
        engine(bundled_ggufs["q4_k"], gguf_cache=tmp_path / "cache" if cache == "on" else "off")
    assert calls["n"] == 20 and glm_models_alive() == before
    assert not list(tmp_path.glob("cache/*")) and not list(tmp_path.glob("cache/.*"))


def test_quantize_option_with_a_gguf_is_refused(bundled_ggufs):
    with pytest.raises(ValueError, match="GGUF file: its weights keep the file's own formats"):
        engine(bundled_ggufs["q8_0"], quantize="int8")


# --- memory -------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_a_gguf_keeps_the_resident_set_near_the_weights(tmp_path, tiny_checkpoint):
    """F32 tensors used in place or copied once (stacked experts), the file's pages dropped as the load moves on:
    the file does not stay resident beside the model built from it (it did: 1.95x the weights)."""
    dtype = "float32"
    config = GLMConfig.preset("tiny", vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=64, n_routed_experts=16,
                              num_experts_per_tok=4, moe_intermediate_size=256)
    folder = write_tiny_checkpoint(tmp_path / "ckpt", config, dtype=torch.float32)
    path = export_gguf(folder, tmp_path / "model.gguf", "f32")[0]
    figures = measure_load_memory(path, dtype)
    fixed = measure_load_memory(export_gguf(tiny_checkpoint, tmp_path / "tiny.gguf", "f32")[0], dtype)
    weights = figures["weights"] - fixed["weights"]
    assert weights > 40 * 2**20, "the model must be big enough to measure"
    assert figures["growth"] - fixed["growth"] <= 1.3 * weights, (figures, fixed)


def test_a_gguf_is_served_under_one_name_before_and_after_it_loads(bundled_ggufs, tmp_path):
    """The server lists its model before the engine has loaded: a GGUF's id is its file's stem both times (a
    split set's without -0000k-of-0000N), and `%glm config model_path=` takes a .gguf file."""
    from workbench.chat import LocalBackend
    from workbench.magics.session import Session

    path = bundled_ggufs["f32"]
    assert LocalBackend(model_path=path).model_id == "mini-f32" == engine(path).name
    split = export_gguf(BUNDLED, tmp_path / "mini.gguf", "f32", split_max_bytes=8 * 2**20)
    assert len(split) > 1 and LocalBackend(model_path=split[1]).model_id == "mini"
    session = Session()
    session.settings.model_path = str(path)
    session.settings.server = "off"
    assert "mini-f32" in session.connection().describe()
