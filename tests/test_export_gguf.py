"""`asymllm export --format gguf` on tiny Llama and Mistral models: the file read back by
transformers' GGUF loader agrees with base + adapter (f32 within fp32 noise; f16/bf16/q8_0 the
same greedy tokens), the q/k rows are in llama.cpp's rope order, a file without that permutation
is refused by the check, and mistakes are refused before anything is written.

    pytest tests/test_export_gguf.py     # ~1.5 min on 2 cores
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from asymllm.export import gguf_file
from asymllm.export.command import ExportError, export, main
from asymllm.export.gguf_vocab import detect_pre_tokenizer
from asymllm.tiny import save_tiny_model
from test_export import make_adapter, smollm2_dir  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(arch): a tiny base of that architecture and an adapter on it, in a folder named like a run."""
    made = {}

    def run(arch: str) -> tuple[str, str]:
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            base = save_tiny_model(root / "base", arch=arch)
            made[arch] = base, make_adapter(base, root / "my-run" / "adapter")
        return made[arch]
    return run


BOTH = pytest.mark.parametrize("arch", ["llama", "mistral"])


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def gguf_path(out) -> str:
    [name] = [f for f in os.listdir(out) if f.endswith(".gguf")]
    return os.path.join(out, name)


@BOTH
@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_the_file_reads_back_as_the_adapted_model(runs, arch, gguf_type, tmp_path):
    base, adapter = runs(arch)
    result = export(adapter=adapter, output=str(tmp_path / "out"), format="gguf", gguf_type=gguf_type)
    assert result.checked.startswith("passed") and "greedy token differs at 0" in result.checked
    path = gguf_path(tmp_path / "out")
    assert os.path.basename(path) == f"my-run-{gguf_type}.gguf"  # named after the run
    assert open(tmp_path / "out" / "Modelfile").read().splitlines()[1] == f"FROM ./my-run-{gguf_type}.gguf"
    reader = GGUFReader(path)
    config = AutoModelForCausalLM.from_pretrained(base).config
    assert field(reader, "general.architecture") == "llama"  # Mistral too: llama.cpp's own mapping
    assert field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads == 2
    assert field(reader, "llama.rope.dimension_count") == config.hidden_size // config.num_attention_heads
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == Q.F32
    assert types["blk.1.ffn_down.weight"] == (Q.Q8_0 if gguf_type == "q8_0" else Q.F32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert field(reader, "tokenizer.ggml.tokens") == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == 3 and types[300] == 1  # control, normal
    assert field(reader, "tokenizer.ggml.add_bos_token") is False and len(field(reader, "tokenizer.ggml.merges")) > 100


def test_a_sentencepiece_style_tokenizer_is_written_as_llama_cpp_reads_it(tmp_path):
    """Llama 2 / Mistral 7B layout (▁ for spaces, <0xNN> byte fallback): llama.cpp's `llama`
    tokenizer model, each token's score minus the rank of the merge that makes it, byte and unknown
    token types, a space prefix and BOS, and the file still reads back as the adapted model."""
    base = save_tiny_model(tmp_path / "base", tokenizer="spm")
    adapter = make_adapter(base, tmp_path / "spm-run" / "adapter")
    result = export(adapter=adapter, output=str(tmp_path / "out"), format="gguf", gguf_type="f32")
    assert result.checked.startswith("passed") and "greedy token differs at 0" in result.checked
    reader = GGUFReader(gguf_path(tmp_path / "out"))
    tokens, scores, types = (field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    import json

    merges = [" ".join(m) for m in json.loads((tmp_path / "base" / "tokenizer.json").read_text())["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.model") == "llama" and field(reader, "tokenizer.ggml.pre") == "default"
    for rank in (0, 1, 50, len(merges) - 1):
        assert scores[tokens.index(merges[rank].replace(" ", ""))] == -rank
    assert types[tokens.index("<0x41>")] == 6 and types[0] == 2 and types[1] == types[2] == 3  # byte, unknown, control
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True and field(reader, "tokenizer.ggml.add_bos_token") is True
    assert "without the chat template (sentencepiece style" in result.checked
    assert "tokenizer.ggml.merges" not in reader.fields  # merged by score, as llama.cpp's converter writes it


def test_sentencepiece_scores_that_do_not_follow_the_merges_fail_the_check(tmp_path, monkeypatch):
    """transformers rebuilds a sentencepiece vocabulary's merges from its scores, as llama.cpp
    merges by them: scores out of order are caught before anything is published."""
    from asymllm.export import gguf_vocab

    base = save_tiny_model(tmp_path / "base", tokenizer="spm")
    adapter = make_adapter(base, tmp_path / "run" / "adapter")
    monkeypatch.setattr(gguf_vocab, "merge_scores", lambda tokens, types, merges: [float(i) for i in range(len(tokens))])  # later tokens first
    with pytest.raises(ExportError, match="tokenizer from the file DIFFERS"):
        export(adapter=adapter, output=str(tmp_path / "out"), format="gguf", gguf_type="f32")
    assert not (tmp_path / "out").exists()


def test_a_sentencepiece_tokenizer_whose_merges_llama_cpp_would_extend_is_refused(tmp_path):
    """llama.cpp joins any two tokens that make a token; a tokenizer.json whose merges leave such
    a pair out would tokenize differently there (a BpeTrainer's own merges do)."""
    import json

    base = save_tiny_model(tmp_path / "base", tokenizer="spm")
    spec = json.loads((tmp_path / "base" / "tokenizer.json").read_text())
    merges = spec["model"]["merges"]
    dropped = next(m for m in merges if len(m) == 2 and m[0] == "▁" and len(m[1]) > 1)
    spec["model"]["merges"] = [m for m in merges if m != dropped]
    (tmp_path / "base" / "tokenizer.json").write_text(json.dumps(spec))
    adapter = make_adapter(base, tmp_path / "run" / "adapter")
    with pytest.raises(ExportError, match=r"pairs of tokens join into a token with no merge for them"):
        export(adapter=adapter, output=str(tmp_path / "out"), format="gguf")


def test_head_dim_tied_embeddings_and_a_padded_vocabulary(tmp_path):
    """head_dim 32 with hidden 64 and 4 heads (attention wider than the model), the output head
    tied to the embedding, 6 ids beyond the tokenizer's: the file says so and reads back right."""
    base = save_tiny_model(tmp_path / "base", head_dim=32, tie_word_embeddings=True, extra_vocab=6)
    adapter = make_adapter(base, tmp_path / "odd" / "adapter")
    result = export(adapter=adapter, output=str(tmp_path / "out"), format="gguf", gguf_type="q8_0")
    assert result.checked.startswith("passed")
    reader = GGUFReader(gguf_path(tmp_path / "out"))
    assert field(reader, "llama.attention.key_length") == field(reader, "llama.rope.dimension_count") == 32
    assert "output.weight" not in {t.name for t in reader.tensors}
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == field(reader, "llama.vocab_size") == 518
    assert tokens[-6:] == [f"[PAD{i}]" for i in range(512, 518)] and set(types[-6:]) == {5}


def test_a_tensor_off_by_a_little_fails_the_check_naming_it(runs, tmp_path, monkeypatch):
    """One weight 0.1% off moves the logits less than the prompts can tell: the tensor check says which."""
    _, adapter = runs("llama")
    real = gguf_file.gguf_data

    def off(t, merged):
        return real(t, merged * 1.001 if t.name == "blk.1.ffn_down.weight" else merged)
    monkeypatch.setattr(gguf_file, "gguf_data", off)
    with pytest.raises(ExportError, match=r"tensor blk\.1\.ffn_down\.weight \(model\.layers\.1\.mlp\.down_proj\.weight\) .* off the merged weight"):
        export(adapter=adapter, output=str(tmp_path / "out"), format="gguf", gguf_type="q8_0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gguf_type", ["f16", "bf16"])
def test_half_precision_files_keep_the_greedy_tokens(runs, gguf_type, tmp_path):
    _, adapter = runs("llama")
    result = export(adapter=adapter, output=str(tmp_path / "out"), format="gguf", gguf_type=gguf_type)
    assert result.checked.startswith("passed") and f"{gguf_type}'s step" in result.checked
    reader = GGUFReader(gguf_path(tmp_path / "out"))
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.attn_q.weight"] == {"f16": Q.F16, "bf16": Q.BF16}[gguf_type]


@BOTH
def test_query_and_key_rows_are_in_llama_cpp_rope_order(runs, arch, tmp_path):
    """HF rotates halves (dim i pairs with i + d/2); llama.cpp rotates neighbours (2i with 2i+1).
    In the file, row 2i of each head must be HF's row i, and row 2i+1 HF's row i + d/2."""
    base, adapter = runs(arch)
    export(adapter=adapter, output=str(tmp_path / "hf"), dtype="fp32")
    export(adapter=adapter, output=str(tmp_path / "gguf"), format="gguf", gguf_type="f32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(gguf_path(tmp_path / "gguf")).tensors}
    config = AutoModelForCausalLM.from_pretrained(base).config
    d = config.hidden_size // config.num_attention_heads
    for hf, name, heads in (("q_proj", "attn_q", config.num_attention_heads), ("k_proj", "attn_k", config.num_key_value_heads)):
        want = merged[f"model.layers.1.self_attn.{hf}.weight"].numpy().reshape(heads, d, -1)
        got = tensors[f"blk.1.{name}.weight"].reshape(heads, d, -1)
        np.testing.assert_array_equal(got[:, 0::2], want[:, : d // 2])
        np.testing.assert_array_equal(got[:, 1::2], want[:, d // 2:])
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"], merged["model.layers.1.self_attn.v_proj.weight"].numpy())


def test_a_file_without_the_rope_permutation_fails_the_check_and_leaves_nothing(runs, tmp_path, monkeypatch):
    _, adapter = runs("llama")
    monkeypatch.setattr(gguf_file, "permute", lambda weights, n_head: weights)
    with pytest.raises(ExportError, match=r"verification FAILED: the GGUF file read back .* max abs logit diff"):
        export(adapter=adapter, output=str(tmp_path / "out"), format="gguf", gguf_type="f32")
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_unsupported_models_and_flags_are_refused_before_writing(runs, tmp_path, capsys):
    base, adapter = runs("llama")
    with pytest.raises(ExportError, match="a GGUF file carries its tokenizer"):
        export(adapter=adapter, output=str(tmp_path / "a"), format="gguf", tokenizer="none")
    with pytest.raises(SystemExit):
        main(["--adapter", adapter, "--output", str(tmp_path / "b"), "--format", "gguf", "--dtype", "bf16"])
    assert "--dtype: not for --format gguf (its weights type is --gguf_type)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--adapter", adapter, "--output", str(tmp_path / "c"), "--gguf_type", "q8_0"])
    assert "--gguf_type and --gguf_pre_tokenizer are for --format gguf" in capsys.readouterr().err

    import json
    import shutil

    scaled = tmp_path / "llama3-rope"
    shutil.copytree(base, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"rope scaling 'llama3'; --format gguf writes models without rope scaling"):
        export(adapter=adapter, base=str(scaled), output=str(tmp_path / "d"), format="gguf")
    with pytest.raises(ExportError, match=r"--gguf_pre_tokenizer 'gpt2': not a name llama.cpp knows"):
        export(adapter=adapter, output=str(tmp_path / "e"), format="gguf", gguf_pre_tokenizer="gpt2")
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_the_command_line_prints_the_check(runs, tmp_path, capsys):
    _, adapter = runs("mistral")
    main(["--adapter", os.path.dirname(adapter), "--output", str(tmp_path / "out"), "--format", "gguf",
          "--gguf_type", "q8_0"])
    out = capsys.readouterr().out
    assert "verification passed: the GGUF file read back by transformers" in out
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"llama-cli -m {tmp_path / 'out' / 'my-run-q8_0.gguf'}" in card and "ollama create my-run" in card


def test_the_file_is_named_after_the_run():
    from asymllm.export.command import run_name
    from asymllm.export.source import AdapterSource

    def named(directory, run_dir=None):
        return run_name(AdapterSource(directory, {}, {}, None, None, "", run_dir))
    assert named("/x/outputs/A_rand_hB_zero-r16-s42/adapter", "/x/outputs/A_rand_hB_zero-r16-s42") == "A_rand_hB_zero-r16-s42"
    assert named("/x/my run/checkpoint-40", "/x/my run") == "my-run-checkpoint-40"
    assert named("/sweep/runs/lora-r16-s0/train/adapter", "/sweep/runs/lora-r16-s0/train") == "lora-r16-s0"  # a sweep cell
    assert named("/x/saved/adapter") == "saved" and named("/x/my_adapter") == "my_adapter"


def test_pre_tokenizer_names_follow_llama_cpp():
    """By llama.cpp's hash of CHKTXT for tokenizers it lists; by structure for plain GPT-2 splitting;
    refused, naming the hash, otherwise."""
    from tokenizers import pre_tokenizers

    from asymllm.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    spec = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}}
    assert detect_pre_tokenizer(tokenizer, spec, "tiny") == "gpt-2"
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert detect_pre_tokenizer(tokenizer, spec, "tiny") == "smollm"
    spec["pre_tokenizer"]["pretokenizers"].reverse()
    with pytest.raises(ExportError, match=r"its pre-tokenizer is not one asymllm recognises \(llama.cpp's hash of it is [0-9a-f]{64}\)"):
        detect_pre_tokenizer(tokenizer, spec, "tiny")


def test_smollm2_tokenizer_is_named_smollm_by_llama_cpp_hash(smollm2_dir):  # noqa: F811
    """The built-in base's tokenizer is in llama.cpp's table (SmolLM-135M's hash): not guessed by structure."""
    import json

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = None  # the structure says nothing: only the hash can name it
    assert detect_pre_tokenizer(tokenizer, spec, smollm2_dir) == "smollm"
