"""The memory plan: block structures from module names, the structure `auto` picks for a budget, the error when
nothing fits, projection.d -> k, and that the Hessian steps hold no d x d copies beyond what the plan counts."""

import tracemalloc

import numpy as np
import pytest

from trackstar.config import EncodeParams, HessianParams, ProjectionParams
from trackstar.errors import ConfigError
from trackstar.hessian.stats import autocorrelation_sums
from trackstar.hessian.whitening import eigenbasis
from trackstar.hessian.plan import BASE_BYTES, GIB, layer_key, plan, structure_blocks

SMOL_MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"]


def smol_layout(k: int = 16, layers: int = 30) -> list[dict]:
    """SmolLM2-135M's encoded modules: 30 blocks x 7 linear modules + lm_head = 211, k^2 columns each."""
    names = [f"model.layers.{i}.{m}" for i in range(layers) for m in SMOL_MODULES] + ["lm_head"]
    return [{"name": n, "start": i * k * k, "stop": (i + 1) * k * k} for i, n in enumerate(names)]


def test_layer_key_groups_modules_by_transformer_block():
    assert layer_key("model.layers.12.mlp.up_proj") == "model.layers.12"
    assert layer_key("transformer.h.3.attn.c_attn") == "transformer.h.3"
    assert layer_key("gpt_neox.layers.0.attention.dense") == "gpt_neox.layers.0"
    assert layer_key("model.layers.1.mlp.experts.7.w1") == "model.layers.1"
    assert layer_key("lm_head") == "lm_head"
    assert layer_key("block2.fc") == "block2.fc"  # a digit inside a name part is not a layer index


def test_structures_over_the_smollm2_layout():
    layout = smol_layout()
    assert structure_blocks(layout, "full") == [(0, 54_016)]
    module = structure_blocks(layout, "module")
    assert len(module) == 211 and all(b - a == 256 for a, b in module)
    layer = structure_blocks(layout, "layer")
    assert [b - a for a, b in layer] == [7 * 256] * 30 + [256]
    assert layer[0] == (0, 1792) and layer[-1] == (53_760, 54_016)


def test_auto_takes_the_coarsest_structure_within_the_budget():
    layout, enc = smol_layout(), EncodeParams()
    picks = {gb: plan(layout, 300, 50, HessianParams(memory_gb=gb), enc).chosen for gb in (40, 8, 0.5, 0.25)}
    assert picks[40].structure == "full"
    assert picks[8].structure == "layer"
    assert picks[0.5].structure == "module"
    assert picks[0.25] is None
    p = plan(layout, 300, 50, HessianParams(), enc)
    full = next(c for c in p.candidates if c.structure == "full")
    d = 54_016
    # counted honestly: the float64 accumulator alone is 8 d^2 (21.7 GiB); eigen holds the float32 block, which
    # becomes the eigenvectors, and LAPACK's 2 d^2-float workspace: 12 d^2
    assert full.autocorrelation >= 8 * d * d + BASE_BYTES and full.eigen >= 12 * d * d + BASE_BYTES
    assert 8 * d * d / GIB == pytest.approx(21.74, abs=0.01)
    assert "layer" in p.text().split("<- used")[0].splitlines()[-1]
    assert p.record()["structure"] == "layer" and p.record()["block_sizes"] == [256, 1792]
    # a fixed structure is used only if it fits
    assert plan(layout, 300, 50, HessianParams(structure="module", memory_gb=40), enc).chosen.structure == "module"
    assert plan(layout, 300, 50, HessianParams(structure="full"), enc).chosen is None
    # disk: raw stores keep g and g_plain (fp32), the final ones g
    assert p.raw_bytes == 350 * d * 4 * 2 and p.final_bytes == 350 * d * 4


def _params_file(tmp_path, hessian: str):
    path = tmp_path / "params.yaml"
    path.write_text("projection:\n  k: 16\nhessian:\n  mix_k: 100\n" + hessian)
    return path


def test_a_budget_nothing_fits_names_the_file_line_and_field(tmp_path):
    path = _params_file(tmp_path, "  memory_gb: 0.25\n")
    p = plan(smol_layout(), 300, 50, HessianParams(memory_gb=0.25), EncodeParams())
    with pytest.raises(ConfigError, match=rf"^{path}:5: field 'hessian.memory_gb': even per-module blocks "
                                          r"\(211 blocks of up to 256 columns\) need .* at d = 54,016, more than 0.25 GiB; "
                                          r"raise hessian.memory_gb or lower projection.k / projection.d"):
        p.require(str(path))
    path = _params_file(tmp_path, "  structure: full\n")
    p = plan(smol_layout(), 300, 50, HessianParams(structure="full"), EncodeParams())
    with pytest.raises(ConfigError, match=rf"^{path}:5: field 'hessian.structure': 'full' needs 3\d\.\d GiB \(eigen\) "
                                          r"at d = 54,016, more than hessian.memory_gb = 8 GiB; use auto \(it picks layer\)"):
        p.require(str(path))


def test_projection_d_picks_the_largest_k_within_it(tmp_path, monkeypatch):
    assert ProjectionParams(k=16).k_for(211) == 16
    assert ProjectionParams(d=65_536).k_for(211) == 17  # 17^2 x 211 = 60,979 <= 2^16 < 18^2 x 211
    assert ProjectionParams(d=211 * 18 * 18).k_for(211) == 18  # exact at a perfect square
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("projection:\n  d: 100\n")
    with pytest.raises(ConfigError, match=r"^params.yaml:2: field 'projection.d': 100 is below one column per "
                                          r"encoded module \(211 modules\)"):
        ProjectionParams(d=100).k_for(211)


def test_no_dense_float64_copies_beyond_the_counted_blocks():
    """tracemalloc sees numpy's and LAPACK-workspace allocations: the accumulators are 8 b^2 per block and the
    eigensolve 4 b^2 (the block, overwritten by its eigenvectors) + 8 b^2 (workspace), nothing d x d more."""
    rng = np.random.default_rng(0)
    d, rows = 600, 40
    x = rng.normal(size=(rows, d)).astype(np.float32)
    chunks = [x[:20], x[20:]]
    autocorrelation_sums([x[:2, :5]], [(0, 5)])  # imports (scipy's BLAS/LAPACK wrappers) before tracing
    eigenbasis(lambda i: np.eye(5, dtype=np.float32), [(0, 5)], 1, lambda: [x[:1, :5]], lambda i: None)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        (acc,), n = autocorrelation_sums(chunks, [(0, d)])
        peak_acc = tracemalloc.get_traced_memory()[1] - base
        r32 = (acc / n).astype(np.float32)
        del acc
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        eigenbasis(lambda i: r32, [(0, d)], 3, lambda: [x[:3]], lambda i: None)
        peak_eig = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert 8 * d * d <= peak_acc < 8 * d * d + 4 * d * d // 2  # the float64 accumulator (+ chunks), no float32 d x d
    assert peak_eig < 8 * d * d + d * d  # workspace; the block itself was counted when it was loaded
