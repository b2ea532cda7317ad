"""`mlx-ltc export --gguf` for a byte-level BPE model (the embedded SmolLM2): mlx-lm's weights and
hyperparameters with llama.cpp's 'gpt2' tokenizer record, built from the model's tokenizer files."""

import json

import numpy as np
import pytest
from conftest import ring_package, run_cli, write_files

from mlx_ltc.use.export import BYTE_LEVEL_BPE, GGUF_NAME, SENTENCEPIECE, bpe_tokenizer_metadata, tokenizer_kind_of

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def values(meta: dict) -> dict:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in meta.items()}


def test_the_embedded_tokenizer_is_recorded_as_llama_cpp_records_smollm2(smollm2_dir):
    spec = json.loads((smollm2_dir / "tokenizer.json").read_text())
    meta = values(bpe_tokenizer_metadata(smollm2_dir, vocab_size=49152))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    by_id = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    assert meta["tokenizer.ggml.tokens"] == [token for token, _ in by_id]
    specials = {t["id"] for t in spec["added_tokens"]}
    assert len(specials) == 17 and {i for i, t in enumerate(meta["tokenizer.ggml.token_type"]) if t != 1} == specials
    assert set(meta["tokenizer.ggml.token_type"]) == {1, CONTROL}
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in spec["model"]["merges"]]
    ids = {k: meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": 1, "eos": 2, "unknown": 0, "padding": 2}  # <|im_start|>, <|im_end|>, <|endoftext|>
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_an_unnamed_pre_tokenizer_is_llama_cpps_default_and_the_vocab_is_padded_to_the_embedding(tmp_path):
    spec = {
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
        "added_tokens": [{"id": 3, "content": "<s>", "special": True}, {"id": 4, "content": "<x>", "special": False}],
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "Isolated"},
        "decoder": {"type": "ByteLevel"},
    }
    write_files(tmp_path, {"tokenizer.json": json.dumps(spec), "tokenizer_config.json": '{"bos_token": "<s>"}'})
    logged = []
    meta = values(bpe_tokenizer_metadata(tmp_path, vocab_size=7, log=logged.append))
    assert meta["tokenizer.ggml.pre"] == "default" and "llama.cpp has no name for the pre-tokenizer Split" in logged[0]
    assert meta["tokenizer.ggml.tokens"] == ["a", "b", "ab", "<s>", "<x>", "[PAD5]", "[PAD6]"]
    assert meta["tokenizer.ggml.token_type"] == [1, 1, 1, CONTROL, USER_DEFINED, USER_DEFINED, USER_DEFINED]
    assert (meta["tokenizer.ggml.merges"], meta["tokenizer.ggml.bos_token_id"]) == (["a b"], 3)


def test_tokenizers_are_told_apart_as_the_gguf_export_records_them(smollm2_dir, tmp_path):
    assert tokenizer_kind_of(smollm2_dir) == BYTE_LEVEL_BPE  # GPT-2 style, like StarCoder2's
    for spec, kind in [
        (
            {"model": {"type": "BPE", "byte_fallback": True}, "decoder": {"type": "Sequence", "decoders": []}},
            SENTENCEPIECE,
        ),
        ({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace"}}, SENTENCEPIECE),
        ({"model": {"type": "WordPiece"}, "pre_tokenizer": {"type": "BertPreTokenizer"}}, None),
    ]:
        (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
        assert tokenizer_kind_of(tmp_path) == kind, spec
    (tmp_path / "tokenizer.json").unlink()
    assert tokenizer_kind_of(tmp_path) is None
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert tokenizer_kind_of(tmp_path) == SENTENCEPIECE


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("gguf")
    repo = write_files(root / "repo", ring_package())
    (root / "cfg.yaml").write_text("eval: {completion_targets: 0, forgetting_tokens: 0}\n")
    proc = run_cli("train", "--repo", repo, "--out", root / "run", "--model", "smollm2-135m", "--seq-len", "128",
                   "--max-steps", "2", "--config", root / "cfg.yaml", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root / "run"


@pytest.mark.slow
def test_gguf_export_of_the_embedded_model_records_its_bpe_tokenizer_and_the_fused_weights(smollm2_run, tmp_path):
    import gguf
    import mlx.core as mx
    from transformers import AutoTokenizer

    from mlx_ltc.models.embedded import _unpermute_rows

    out = tmp_path / "export"
    proc = run_cli("export", smollm2_run, "--out", out, "--gguf")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.glob("*.gguf")] == [GGUF_NAME]  # mlx-lm's draft is gone
    reader = gguf.GGUFReader(out / GGUF_NAME)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("general.architecture"), len(reader.tensors)) == ("llama", 272)
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "smollm")
    assert "tokenizer.ggml.scores" not in reader.fields  # SentencePiece's, which mlx-lm wrote
    tok = AutoTokenizer.from_pretrained(str(out))
    assert field("tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(49152)))
    types = np.array(field("tokenizer.ggml.token_type"))
    assert sorted(np.flatnonzero(types == CONTROL).tolist()) == sorted(tok.all_special_ids) and len(types) == 49152
    spec = json.loads((out / "tokenizer.json").read_text())
    assert field("tokenizer.ggml.merges") == [" ".join(pair) for pair in spec["model"]["merges"]]
    for key, token_id in [("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unknown", tok.unk_token_id),
                          ("padding", tok.pad_token_id)]:  # fmt: skip
        assert field(f"tokenizer.ggml.{key}_token_id") == token_id
    assert field("llama.attention.head_count") == 9 and field("llama.attention.head_count_kv") == 3
    fused = mx.load(str(out / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    for name, key, heads in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
                             ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 3),
                             ("token_embd.weight", "model.embed_tokens.weight", None)]:  # fmt: skip
        data = np.array(tensors[name].data)
        data = _unpermute_rows(data, heads) if heads else data  # llama.cpp's RoPE row order, undone
        np.testing.assert_array_equal(data, np.array(fused[key].astype(mx.float16)))
