"""The estimated-moments file (stage `moments`) and what the encoder reads from it, the model's
context checked against gradients.max_length."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.pipeline import ROOT, run
from trackstar.model.checkpoint import checkpoint_hash, save_checkpoint
from trackstar import layout
from trackstar.config import Params
from trackstar.encode.correction import rank1_scales
from trackstar.encode.encoder import Encoder
from trackstar.errors import ArtifactMismatch, ConfigError, InputError, TrackStarError
from trackstar.data.examples import pad_token_id
from trackstar.encode.gradients import per_example_grads
from trackstar.encode.layers import find_layers
from trackstar.encode.moments import read_moments, sample_passages, second_moments, write_moments
from trackstar.model.train import train_tokenizer

TEXTS = [f"Entity {i} was born in city {i % 5} and works for company {i % 3}." for i in range(12)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A stage working directory: model/ (tiny GPT-2 with a real BPE tokenizer, no optimizer state) and
    data/corpus.jsonl."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("moments")
    tok = train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    save_checkpoint(model.eval(), tok, None, d / "model")
    (d / "data").mkdir()
    (d / "data/corpus.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n"
                                                 for i, t in enumerate(TEXTS)))
    return d


def moments_stage(d: Path, correction: dict):
    (d / "params.yaml").write_text(yaml.safe_dump({"correction": correction, "gradients": {"max_length": 24},
                                                   "encode": {"batch_size": 5}}))
    return run(d, sys.executable, str(ROOT / "stages/moments.py"), check=False)


def encoder(d: Path, kind: str, max_length: int = 24) -> Encoder:
    params = Params(gradients={"max_length": max_length}, correction={"kind": kind, "eps": 1e-8},
                    projection={"k": 4}, encode={"device": "cpu"})
    return Encoder.from_params(params, d)


def test_stage_estimates_the_mean_squared_per_example_gradient(workdir):
    proc = moments_stage(workdir, {"kind": "estimated", "estimate_samples": 8, "seed": 3})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["samples"] == 8
    enc = encoder(workdir, "estimated")
    got = read_moments(workdir / layout.MOMENTS, checkpoint_hash(workdir / "model"))
    # independent: the same seeded sample, plain autograd one example at a time
    layers = find_layers(enc.model, include_lm_head=True)
    sample = sample_passages(enc.tok, workdir / "data/corpus.jsonl", 8, 3, 24)
    want = {l.name: torch.zeros(l.n_out, l.n_in, dtype=torch.float64) for l in layers}
    for g in per_example_grads(enc.model, layers, sample, pad_token_id(enc.tok)):
        for l in layers:
            want[l.name] += g[l.name].double() ** 2
    assert sorted(got) == sorted(l.param_name for l in layers)
    for l in layers:
        v = (want[l.name] / 8)  # (out, in): the full mean squared per-example gradient
        row, col = got[l.param_name]
        torch.testing.assert_close(row.double(), v.mean(1), rtol=1e-4, atol=1e-7 * v.abs().max().item())
        torch.testing.assert_close(col.double(), v.mean(0), rtol=1e-4, atol=1e-7 * v.abs().max().item())
        # the encoder's correction is the rank-1 fit of exactly these moments
        s_out, s_in = rank1_scales(v.float(), 1e-8)
        torch.testing.assert_close(enc.correction.scales[l.name][0], s_out, rtol=1e-4, atol=0)
        torch.testing.assert_close(enc.correction.scales[l.name][1], s_in, rtol=1e-4, atol=0)


def test_other_kinds_write_the_same_empty_file(workdir):
    out = workdir / layout.MOMENTS
    blobs = []
    for kind, seed in (("adam_rank1", 0), ("adam_rank1", 1), ("none", 0)):
        proc = moments_stage(workdir, {"kind": kind, "seed": seed})
        assert proc.returncode == 0, proc.stderr[-3000:]
        blobs.append(out.read_bytes())
    assert blobs[0] == blobs[1] != blobs[2]  # deterministic; only the kind is recorded
    with pytest.raises(ArtifactMismatch, match="not 'estimated'"):
        read_moments(out, checkpoint_hash(workdir / "model"))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_moments_of_another_checkpoint_or_none_are_refused(workdir, tmp_path):
    path = tmp_path / "m.safetensors"
    write_moments(path, {"w@row": torch.ones(2), "w@col": torch.ones(3)},
                  {"kind": "estimated", "checkpoint_hash": "0" * 64})
    with pytest.raises(ArtifactMismatch, match="not the current model"):
        read_moments(path, checkpoint_hash(workdir / "model"))
    with pytest.raises(InputError, match="dvc repro moments"):
        read_moments(tmp_path / "missing.safetensors", "x")
    write_moments(tmp_path / "half.safetensors", {"w@row": torch.ones(2)}, {"kind": "estimated", "checkpoint_hash": "x"})
    with pytest.raises(InputError, match="needs an @row and an @col"):
        read_moments(tmp_path / "half.safetensors", "x")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="corrupt moments file"):
        read_moments(tmp_path / "bad.safetensors", "x")


def test_max_length_beyond_the_model_context_is_refused(workdir):
    (workdir / "params.yaml").write_text("gradients:\n  max_length: 64\n")
    with pytest.raises(ConfigError, match=r"params.yaml:2: field 'gradients.max_length': 64 exceeds the context "
                                          r"of the model in .* \(32 positions\)"):
        encoder(workdir, "none", max_length=64)
    proc = moments_stage(workdir, {"kind": "estimated"})
    assert proc.returncode == 0  # 24 fits
    (workdir / layout.MOMENTS).unlink()
    (workdir / "params.yaml").write_text(yaml.safe_dump({"correction": {"kind": "estimated"},
                                                         "gradients": {"max_length": 64}}))
    proc = run(workdir, sys.executable, str(ROOT / "stages/moments.py"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "field 'gradients.max_length': 64 exceeds the context of the model in model (32 positions)" in proc.stderr
    assert not (workdir / layout.MOMENTS).exists()



def test_tail_patch_without_optimizer_state_steps_with_the_estimated_moments(workdir):
    """evaluate's tail-patch on a checkpoint without optimizer state: v-hat is the rank-1 fit of the
    `moments` stage's estimate (independently: r c^T / mean(v) of the mean squared per-example gradient
    of each weight, by plain autograd), and the step it takes is theta - lr g / sqrt(v-hat + eps)."""
    from trackstar.model.checkpoint import load_checkpoint
    from trackstar.data.examples import collate, per_example_loss, query_example
    from trackstar.evaluation.tailpatch import Step, batched_deltas

    proc = moments_stage(workdir, {"kind": "estimated", "estimate_samples": 8, "seed": 3})
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tok = load_checkpoint(workdir / "model")
    model = model.double()
    pad = pad_token_id(tok)
    moments = second_moments(workdir / "model", workdir / layout.MOMENTS, checkpoint_hash(workdir / "model"))
    assert moments.source == "estimated"
    got = moments.v_hat(model)
    # independent reference: per-example loss gradients of the whole model, one at a time, in each
    # parameter's own orientation (Conv1D (in, out) included): the fit is orientation-free
    sample = sample_passages(tok, workdir / "data/corpus.jsonl", 8, 3, 24)
    # (the tied output head's weight: its use as lm_head only, d loss / d logits times its input)
    params = dict(model.named_parameters())
    sq = {n: torch.zeros_like(p) for n, p in params.items()}
    head_sq = torch.zeros_like(params["transformer.wte.weight"])
    seen = {}
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.update(h=i[0], logits=o))
    for ex in sample:
        b = collate([ex], pad)
        model(input_ids=b["input_ids"])
        loss = per_example_loss(seen["logits"], b["input_ids"], b["loss_mask"]).sum()
        *grads, dlogits = torch.autograd.grad(loss, [*params.values(), seen["logits"]])
        for (n, _), g in zip(params.items(), grads):
            sq[n] += g.detach() ** 2
        head_sq += (dlogits[0].T @ seen["h"][0]).detach() ** 2
    hook.remove()
    sq["transformer.wte.weight"] = head_sq  # tied: the moments are lm_head's (a Linear use of the weight)
    weights = {n for n, p in params.items() if p.dim() == 2 and n != "transformer.wpe.weight"}  # Linear/Conv1D
    assert sorted(got) == sorted(weights)
    for n in weights:
        v = sq[n] / len(sample)
        want = torch.outer(v.mean(1), v.mean(0)) / v.mean()
        torch.testing.assert_close(got[n].double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    # one tail-patch step with it: every covered weight divided by sqrt(v-hat + eps), the rest a plain step
    q = query_example(tok, "Entity 3 was born in", " city 3", 24)
    p = sample[0]
    lr, eps = 1e-4, 1e-8
    b = collate([p], pad)
    loss = per_example_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"]).sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    new = {n: (t - lr * (grads[n] / (got[n].double() + eps).sqrt() if n in got else grads[n])).detach()
           for n, t in params.items()}

    def logprob(ps) -> float:
        from torch.func import functional_call

        c = collate([q], pad)
        with torch.no_grad():
            logits = functional_call(model, ps, args=(), kwargs={"input_ids": c["input_ids"]}).logits
        return -float(per_example_loss(logits, c["input_ids"], c["loss_mask"]).sum())

    want_delta = logprob(new) - logprob(params)
    (got_delta,) = batched_deltas(model, [q], [(0, p)], Step(lr, got, pad, eps, progress=False))
    assert abs(want_delta) > 1e-4
    assert got_delta == pytest.approx(want_delta, rel=1e-6)
    # another correction kind (an empty file) or no file: no estimate, a plain step
    proc = moments_stage(workdir, {"kind": "none"})
    assert proc.returncode == 0
    for file in (workdir / layout.MOMENTS, workdir / "absent.safetensors"):
        none = second_moments(workdir / "model", file, checkpoint_hash(workdir / "model"))
        assert (none.source, none.key, none.v_hat(model)) == ("none", "none", None)


def test_one_resolver_picks_the_moments_of_the_correction_and_of_the_tail_patch_step(workdir, tmp_path):
    """correction.kind names the moments the encoder divides by; a tail-patch step takes the checkpoint's
    Adam state whenever it has one, and the estimate only without it."""
    from trackstar.fingerprint import file_sha256
    from trackstar.model.checkpoint import load_checkpoint, load_second_moments

    proc = moments_stage(workdir, {"kind": "estimated", "estimate_samples": 4})
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tok = load_checkpoint(workdir / "model")
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.square().mean().backward()  # every parameter stepped
    opt.step()
    with_state = tmp_path / "model"
    save_checkpoint(model, tok, opt, with_state)
    plain = workdir / "model"
    ck = {m: checkpoint_hash(m) for m in (with_state, plain)}
    files = {plain: workdir / layout.MOMENTS, with_state: tmp_path / "moments.safetensors"}
    est = read_moments(files[plain], ck[plain])  # the same estimate, recorded for the checkpoint with state
    write_moments(files[with_state], {f"{n}@{side}": t for n, rc in est.items() for side, t in zip(("row", "col"), rc)},
                  {"kind": "estimated", "checkpoint_hash": ck[with_state]})
    picked = {(m.name if m == plain else "state", kind): second_moments(m, files[m], ck[m], kind).source
              for m in (with_state, plain) for kind in (None, "adam_rank1", "estimated", "none")}
    assert picked == {("state", None): "optimizer_state", ("state", "adam_rank1"): "optimizer_state",
                      ("state", "estimated"): "estimated", ("state", "none"): "none",
                      ("model", None): "estimated", ("model", "adam_rank1"): "none",
                      ("model", "estimated"): "estimated", ("model", "none"): "none"}
    adam = second_moments(with_state, files[with_state], ck[with_state])
    assert adam.key == "optimizer_state" and adam.v_hat(model) is adam.tensors
    assert adam.tensors.keys() == load_second_moments(with_state)[0].keys()
    assert second_moments(plain, files[plain], ck[plain]).key == "estimated:" + file_sha256(files[plain])
    with pytest.raises(TrackStarError, match="has no optimizer_state.safetensors"):
        encoder(workdir, "adam_rank1")
