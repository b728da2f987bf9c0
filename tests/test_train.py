import json

import pytest
import torch

from tests.tiny import oracle_cases
from trackstar.model.checkpoint import (
    OPT_META,
    OPT_TENSORS,
    checkpoint_hash,
    load_checkpoint,
    load_second_moments,
    save_checkpoint,
)
from trackstar.data.records import Query
from trackstar.data.world import FactWorldConfig, generate_fact_world
from trackstar.errors import InputError
from trackstar.data.examples import query_example
from trackstar.model.train import ModelConfig, TrainConfig, accuracy, build_model, pretrain, train_tokenizer

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def world():
    passages, queries, _ = generate_fact_world(FactWorldConfig(seed=1, entities=12, relations=2, paraphrases=2, contradicted=0.0, query_wording="held_out"))
    texts = [p.text for p in passages]
    tok = train_tokenizer(texts, 300)
    return texts, queries, tok


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    texts, queries, tok = world
    model = build_model(TINY, tok)
    opt = pretrain(model, tok, texts, TrainConfig(epochs=4, batch_size=8, lr=1e-2, weight_decay=0.01, max_length=48), progress=False)
    out = tmp_path_factory.mktemp("ck") / "checkpoint"
    save_checkpoint(model, tok, opt, out)
    return model, opt, out


def test_tokenizer_specials_and_leading_space(world):
    texts, queries, tok = world
    assert tok.bos_token == "<bos>" and tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok("Alpha beta", add_special_tokens=True)["input_ids"] == tok("Alpha beta", add_special_tokens=False)["input_ids"]
    for q in queries[:5]:
        alone = tok(q.target, add_special_tokens=False)["input_ids"]
        ctx = tok(q.prompt + q.target + ".", add_special_tokens=False)["input_ids"]
        pre = tok(q.prompt, add_special_tokens=False)["input_ids"]
        assert ctx[: len(pre)] == pre and ctx[len(pre) : len(pre) + len(alone)] == alone
        assert tok.decode(alone) == q.target


def test_model_config(world):
    _, _, tok = world
    m = build_model(ModelConfig(), tok)
    c = m.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (128, 4, 4, 512)
    assert c.vocab_size == len(tok) and not c.tie_word_embeddings
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    # seeded init
    m2 = build_model(ModelConfig(), tok)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_pretrain_deterministic_and_learns(world, trained):
    texts, _, tok = world
    model, opt, _ = trained
    m2 = build_model(TINY, tok)
    pretrain(m2, tok, texts, TrainConfig(epochs=4, batch_size=8, lr=1e-2, weight_decay=0.01, max_length=48), progress=False)
    for (n, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    # loss went down versus an untrained model
    from trackstar.data.examples import collate, passage_example, per_example_loss

    batch = collate([passage_example(tok, t, 48) for t in texts[:32]], tok.pad_token_id)

    def loss(m):
        with torch.no_grad():
            lg = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(per_example_loss(lg, batch["input_ids"], batch["loss_mask"]).sum())

    assert loss(model) < 0.9 * loss(build_model(TINY, tok))
    assert not model.training


def test_checkpoint_roundtrip(world, trained):
    texts, queries, tok = world
    model, opt, out = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", OPT_TENSORS, OPT_META} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    m2, t2 = load_checkpoint(out)
    assert not m2.training
    sd1, sd2 = model.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    for t in texts[:5] + [q.prompt + q.target for q in queries[:5]]:
        assert tok(t)["input_ids"] == t2(t)["input_ids"]
    assert (t2.bos_token_id, t2.eos_token_id, t2.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    ids = torch.tensor([query_example(tok, queries[0].prompt, queries[0].target, 48).input_ids])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, m2(input_ids=ids).logits)
    meta = json.loads((out / OPT_META).read_text())
    assert meta["kind"] == "adamw" and meta["betas"][1] == 0.999 and meta["eps"] == 1e-8
    assert meta["weight_decay"] == 0.01 and meta["step"] == 4 * -(-len(texts) // 8)
    assert 0 < meta["lr"] < 1e-6  # one-cycle ends near zero; the lr of the last step is recorded
    # hash: stable, and changes when a weight changes
    h = checkpoint_hash(out)
    assert h == checkpoint_hash(out) and len(h) == 64
    # overwrite in place (atomic replace of an existing directory)
    with torch.no_grad():
        m2.model.norm.weight.add_(1.0)
    out2 = out.parent / "other"
    save_checkpoint(m2, t2, None, out2)
    assert checkpoint_hash(out2) != h
    assert load_second_moments(out2) is None
    save_checkpoint(m2, t2, None, out2)  # replacing an existing dir works
    assert (out2 / "config.json").exists()


def test_second_moments_bias_correction(world, trained):
    model, opt, out = trained
    v, meta = load_second_moments(out)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(v) == sorted(names)
    beta2 = opt.param_groups[0]["betas"][1]
    for n, p in model.named_parameters():
        st = opt.state[p]
        step = int(st["step"])
        expect = st["exp_avg_sq"] / (1 - beta2**step)
        torch.testing.assert_close(v[n], expect, rtol=1e-6, atol=0)
        assert v[n].shape == p.shape


def test_second_moments_independent_of_torch_internals(tmp_path, world):
    """Compute v̂ by hand for a few AdamW steps and compare with what the checkpoint gives."""
    _, _, tok = world
    model = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok)
    b2 = 0.95
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, b2), weight_decay=0.0)
    manual = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7, tok.eos_token_id]])
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for n, p in model.named_parameters():
            manual[n] = b2 * manual[n] + (1 - b2) * p.grad.detach() ** 2
        opt.step()
    save_checkpoint(model, tok, opt, tmp_path / "ck")
    v, meta = load_second_moments(tmp_path / "ck")
    assert meta["step"] == 3
    for n in manual:
        torch.testing.assert_close(v[n], manual[n] / (1 - b2**3), rtol=1e-5, atol=1e-12)


def test_bad_checkpoint_dirs(tmp_path, trained):
    _, _, out = trained
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_checkpoint(tmp_path / "empty")
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / OPT_TENSORS).write_bytes(b"garbage")
    with pytest.raises(InputError, match=OPT_TENSORS):
        load_second_moments(bad)
    shutil.copy(out / OPT_TENSORS, bad / OPT_TENSORS)
    (bad / OPT_META).write_text("{not json")
    with pytest.raises(InputError, match=OPT_META):
        load_second_moments(bad)
    (bad / OPT_META).write_text(json.dumps({"kind": "adamw", "step": 0, "betas": [0.9, 0.999]}))
    with pytest.raises(InputError, match="step"):
        load_second_moments(bad)
    # moments of a different model
    from safetensors.torch import save_file

    shutil.copy(out / OPT_META, bad / OPT_META)
    save_file({"model.norm.weight": torch.ones(3)}, str(bad / OPT_TENSORS))
    with pytest.raises(InputError, match="mismatched"):
        load_second_moments(bad)
    (bad / OPT_META).unlink()
    with pytest.raises(InputError, match="missing"):
        load_second_moments(bad)


def test_accuracy_hand_made(world):
    _, _, tok = world
    target, cases, model = oracle_cases(tok, wrong_at=1)
    qs = [Query(str(i), p, target) for i, p in enumerate(cases)]
    assert accuracy(model, tok, qs, max_length=64, batch_size=2) == pytest.approx(1 / 3)
    assert accuracy(model, tok, qs[:1] * 3, max_length=64) == 1.0
    assert accuracy(model, tok, qs[1:], max_length=64) == 0.0
