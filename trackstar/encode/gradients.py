"""Per-example loss gradients of linear layers, corrected and randomly projected.

Fast path (`HookProjector`): forward hooks project each layer's input a_t (P_in s_in*a_t) and a
tensor hook projects its output-gradient delta_t (P_out s_out*delta_t); the k x k block
sum_t (P_out delta_t)(P_in a_t)^T is the projected per-example weight gradient, never forming
the n_out x n_in matrix. Weight gradients themselves are not computed (parameters frozen). Under bf16
autocast the model's own forward and backward run in bf16; the projections and the k x k sums run in fp32 on
the upcast activations and output-gradients.
Reference path (`reference_encode`): full per-example gradients by autograd, one example at a
time, corrected element-wise or by the rank-1 scales, then densely projected.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from trackstar.encode.correction import Correction, apply_exact, apply_rank1
from trackstar.data.examples import Example, collate, per_example_loss
from trackstar.encode.layers import Layer, output_head_name
from trackstar.encode.projection import Projection, project_dense


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter and make the input embeddings' output require grad, so a backward pass
    computes activation gradients only (what the layer hooks read), never weight gradients."""
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        handle.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])


def fp32(x: torch.Tensor) -> torch.autocast:
    """Autocast off on x's device: matmuls inside run in the dtype of their (upcast) operands, fp32."""
    return torch.autocast(x.device.type, enabled=False)


class HookProjector:
    """Computes [B, d] projected (corrected and optionally plain) gradients for a batch."""

    def __init__(self, model: nn.Module, projection: Projection, correction: Correction | None, plain: bool):
        if correction is not None and correction.exact:
            raise ValueError("correction.kind: adam is element-wise and cannot run on the hook path; "
                             "use the reference encoder, or adam_rank1")
        self.model, self.layers, self.k, self.plain = model, projection.layers, projection.k, plain
        dev = next(model.parameters()).device  # projections and corrections live with the model
        mats = projection.matrices(dev)
        self.p_out = {name: p_out for name, (p_out, _) in mats.items()}
        self.p_in = {name: p_in for name, (_, p_in) in mats.items()}
        self.scaled = correction is not None and correction.scales is not None
        if self.scaled:
            # fold the rank-1 scales into the projections: P diag(s) x = (P * s) x
            c_out = {n: self.p_out[n] * correction.scales[n][0].to(dev) for n in self.p_out}
            c_in = {n: self.p_in[n] * correction.scales[n][1].to(dev) for n in self.p_in}
        else:
            c_out, c_in = self.p_out, self.p_in
        # corrected and plain projections stacked [2k, n]: one matmul per side, then one batched
        # product over both halves (2B x k x k)
        self.fused = plain and self.scaled
        self.w_out = {n: torch.cat([c_out[n], self.p_out[n]]) if self.fused else c_out[n] for n in self.p_out}
        self.w_in = {n: torch.cat([c_in[n], self.p_in[n]]) if self.fused else c_in[n] for n in self.p_in}
        self._blocks: dict[str, torch.Tensor] = {}
        self._plain_blocks: dict[str, torch.Tensor] = {}

    def _forward_hook(self, name: str):
        k = self.k

        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return
            # no padding mask: with the loss masked to real tokens, the output-gradient of a padded
            # position is exactly zero (nothing downstream of it reaches the loss), so its term vanishes
            with fp32(inputs[0]):  # under bf16 autocast too: the bf16 activations are upcast, projected in fp32
                a = inputs[0].float() @ self.w_in[name].T

            def tensor_hook(grad: torch.Tensor):
                with fp32(grad):
                    go = grad.float() @ self.w_out[name].T
                    if self.fused:  # [B, T, 2k] -> [2B, k, T] x [2B, T, k]: the two k x k products only
                        b, t = go.shape[0], go.shape[1]
                        g2 = go.view(b, t, 2, k).permute(0, 2, 3, 1).reshape(2 * b, k, t)
                        a2 = a.view(b, t, 2, k).transpose(1, 2).reshape(2 * b, t, k)
                        blk = torch.bmm(g2, a2).view(b, 2, k * k)
                        cor, pl = blk[:, 0], blk[:, 1]
                    else:
                        cor = pl = torch.bmm(go.transpose(1, 2), a).flatten(1)  # no correction: plain == corrected
                self._blocks[name] = self._blocks.get(name, 0) + cor
                if self.plain:
                    self._plain_blocks[name] = self._plain_blocks.get(name, 0) + pl

            output.register_hook(tensor_hook)
        return hook

    @contextmanager
    def attached(self) -> Iterator["HookProjector"]:
        """Register hooks and freeze parameters (activation gradients only) for the duration."""
        mods = dict(self.model.named_modules())
        handles = [mods[l.name].register_forward_hook(self._forward_hook(l.name)) for l in self.layers]
        try:
            with frozen_parameters(self.model):
                yield self
        finally:
            for h in handles:
                h.remove()

    def encode_batch(self, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected per-example gradients of one collated batch: (corrected [B, d], plain [B, d] or None)."""
        dev = next(self.model.parameters()).device
        ids, att, lm = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "loss_mask"))
        self._blocks, self._plain_blocks = {}, {}
        with torch.enable_grad():
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = self.model(input_ids=ids, attention_mask=att).logits
            per_example_loss(logits, ids, lm).sum().backward()
        zeros = torch.zeros(ids.shape[0], self.k * self.k, device=dev)
        out = torch.cat([self._blocks.get(l.name, zeros) for l in self.layers], dim=1)
        plain = torch.cat([self._plain_blocks.get(l.name, zeros) for l in self.layers], dim=1) if self.plain else None
        self._blocks, self._plain_blocks = {}, {}
        return out, plain


@contextmanager
def _untied_head(model: nn.Module) -> Iterator[None]:
    """Give a tied output head its own weight copy, so its gradient is the head's usage only
    (what the hook path sees), not the sum with the input-embedding lookup."""
    head_name = output_head_name(model)
    head = dict(model.named_modules()).get(head_name) if head_name else None
    emb = model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        yield
        return
    shared = head.weight
    head.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    try:
        yield
    finally:
        head.weight = shared


def per_example_grads(model: nn.Module, layers: list[Layer], examples: list[Example], pad_id: int
                      ) -> Iterator[dict[str, torch.Tensor]]:
    """Full weight gradients per example, (out, in) orientation, by plain autograd one at a time."""
    mods = dict(model.named_modules())
    dev = next(model.parameters()).device
    with _untied_head(model):
        weights = {l.name: mods[l.name].weight for l in layers}
        for ex in examples:
            b = {k: v.to(dev) for k, v in collate([ex], pad_id).items()}
            with torch.enable_grad():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = per_example_loss(logits, b["input_ids"], b["loss_mask"]).sum()
                grads = torch.autograd.grad(loss, [weights[l.name] for l in layers], allow_unused=True)
            yield {l.name: (l.weight_grad_out_in(g).float() if g is not None else
                            torch.zeros(l.n_out, l.n_in, device=dev)) for l, g in zip(layers, grads)}


def reference_encode(model: nn.Module, projection: Projection, examples: list[Example], pad_id: int,
                     correction: Correction | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-example gradients, corrected (element-wise for correction.kind adam, else by the rank-1
    scales) and densely projected with the same seeded matrices as the hook path: (corrected [N, d], plain [N, d])."""
    dev = next(model.parameters()).device  # inputs, projections and corrections live with the model
    layers, p = projection.layers, projection.matrices(dev)
    on_dev = correction is not None and correction.kind != "none"
    rank1 = on_dev and not correction.exact
    scales = {n: (a.to(dev), b.to(dev)) for n, (a, b) in correction.scales.items()} if rank1 else None
    rows, plain_rows = [], []
    for g in per_example_grads(model, layers, examples, pad_id):
        cor, pl = [], []
        for l in layers:
            G = g[l.name]
            pl.append(project_dense(G, *p[l.name]))
            if not on_dev:
                Gc = G
            elif rank1:
                Gc = apply_rank1(G, *scales[l.name])
            else:
                Gc = apply_exact(G, correction.v[l.name].to(dev), correction.eps)
            cor.append(project_dense(Gc, *p[l.name]))
        rows.append(torch.cat(cor).cpu())
        plain_rows.append(torch.cat(pl).cpu())
    return torch.stack(rows), torch.stack(plain_rows)


def estimate_second_moments(model: nn.Module, layers: list[Layer], examples: list[Example], pad_id: int,
                            batch_size: int = 16, progress: bool = False
                            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Row and column means of the mean squared per-example gradient v = E[G * G] (Adam's v stand-in),
    keyed by parameter name, in (out, in) orientation: all the rank-1 (Adafactor-style) correction uses.

    One backward per batch on the model's device, parameters frozen. The full per-example gradient
    G = sum_t delta_t a_t^T is never formed: its squared row sums are sum_{t,s} delta_t delta_s (a_t . a_s)
    and its squared column sums sum_{t,s} a_t a_s (delta_t . delta_s), from T x T Gram matrices of the
    hooks' inputs and output-gradients (T tokens): O(T^2 (n_out + n_in)) per example, not O(T n_out n_in).
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("cannot estimate second moments from zero examples")
    dev = next(model.parameters()).device
    rows = {l.name: torch.zeros(l.n_out, dtype=torch.float64, device=dev) for l in layers}
    cols = {l.name: torch.zeros(l.n_in, dtype=torch.float64, device=dev) for l in layers}

    def forward_hook(name: str):
        def hook(module, inputs, output):
            a = inputs[0].detach().float()

            def tensor_hook(grad: torch.Tensor):
                g = grad.float()  # [b, T, out]; a: [b, T, in]
                rows[name] += ((a @ a.transpose(1, 2)) @ g * g).sum((0, 1), dtype=torch.float64)
                cols[name] += ((g @ g.transpose(1, 2)) @ a * a).sum((0, 1), dtype=torch.float64)

            output.register_hook(tensor_hook)
        return hook

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # little padding per batch
    mods = dict(model.named_modules())
    handles = [mods[l.name].register_forward_hook(forward_hook(l.name)) for l in layers]
    bar = tqdm(total=len(examples), desc="moments", unit="ex", disable=not progress or None, mininterval=2.0)
    try:
        with frozen_parameters(model), torch.enable_grad():
            for i in range(0, len(order), batch_size):
                b = collate([examples[j] for j in order[i:i + batch_size]], pad_id)
                ids, att, lm = (b[k].to(dev) for k in ("input_ids", "attention_mask", "loss_mask"))
                logits = model(input_ids=ids, attention_mask=att).logits
                per_example_loss(logits, ids, lm).sum().backward()
                bar.update(ids.shape[0])
    finally:
        bar.close()
        for h in handles:
            h.remove()
    n = len(examples)
    return {l.param_name: ((rows[l.name] / (n * l.n_in)).float().cpu(), (cols[l.name] / (n * l.n_out)).float().cpu())
            for l in layers}
