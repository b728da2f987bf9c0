"""Exact top-k / bottom-k inner-product search streamed over a store larger than RAM.

One pass over the store, chunk by chunk; every query keeps a running top-k (proponents) and
bottom-k (opponents). `search_blocks` runs one such pass per block of query rows read from a query
store, so neither side is ever read whole. Also the ground truth for ANN recall.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from trackstar.store import ConcatReader

Found = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # top scores, top rows, bottom scores, bottom rows


def exact_search(queries: np.ndarray, chunks: Iterable[tuple[int, np.ndarray]], k: int,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None, query_batch: int = 1024) -> Found:
    """(top scores, top rows, bottom scores, bottom rows), each [Q, k], best first / most negative first.
    Ties break toward the lower row index. `transform` maps each chunk before scoring (the ladder's
    whitening); the scores of `query_batch` queries against one chunk are one matrix product."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    nq = q.shape[0]
    top_s = torch.full((nq, 0), -np.inf)
    top_i = torch.zeros((nq, 0), dtype=torch.long)
    bot_s, bot_i = torch.full((nq, 0), np.inf), torch.zeros((nq, 0), dtype=torch.long)
    for start, x in chunks:
        if transform is not None:
            x = transform(x)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        for b in range(0, nq, query_batch):
            s = q[b:b + query_batch] @ xt.T
            top_s_b, top_i_b = _merge(top_s[b:b + query_batch], top_i[b:b + query_batch], *_block_best(s, start, k, True), k,
                                      largest=True)
            bot_s_b, bot_i_b = _merge(bot_s[b:b + query_batch], bot_i[b:b + query_batch], *_block_best(s, start, k, False), k,
                                      largest=False)
            if b == 0:
                new = [top_s_b, top_i_b, bot_s_b, bot_i_b]
            else:
                new = [torch.cat([a, c]) for a, c in zip(new, [top_s_b, top_i_b, bot_s_b, bot_i_b])]
        top_s, top_i, bot_s, bot_i = new
    return top_s.numpy(), top_i.numpy(), bot_s.numpy(), bot_i.numpy()


def search_blocks(queries: ConcatReader, rows: int, search: Callable[[np.ndarray], Found]) -> Found:
    """`search` run on each block of `rows` query rows in turn, the results stacked in query order: the query
    store is read one block at a time (each block one pass over the searched store), never whole."""
    parts = [search(q) for _, q in queries.iter_blocks(rows)]
    if not parts:
        raise ValueError(f"{queries.path}: no query rows to search")
    return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


def _block_best(s: torch.Tensor, start: int, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The best min(k, n) columns of a [Q, n] score block (rows start..start+n-1) by a partial selection
    (topk), not a sort of the block: sorting every block was ~5x the cost of the matmul. topk breaks ties
    arbitrarily, so a query whose k-th value is shared by more columns than it kept is redone by a stable
    full sort (lower row first): the result is exactly that of sorting the whole block."""
    kk = min(k, s.shape[1])
    key = s if largest else -s
    v, j = torch.topk(key, kk, dim=1, largest=True, sorted=False)
    ids = j + start
    tied = torch.nonzero((key >= v.min(dim=1, keepdim=True).values).sum(dim=1) > kk).flatten()
    if len(tied):
        rows = torch.arange(start, start + s.shape[1]).expand(len(tied), -1)
        _, full_i = _merge(s[tied, :0], rows[:, :0], s[tied], rows, kk, largest)
        ids[tied] = full_i
    return s.gather(1, ids - start), ids


def _merge(best_s, best_i, s, ids, k, largest: bool):
    """Merge running best with new candidates; stable so equal scores keep the lower row first."""
    cat_s = torch.cat([best_s, s], dim=1)
    cat_i = torch.cat([best_i, ids], dim=1)
    key = -cat_s if largest else cat_s
    # sort by (key, row): stable sort on row first, then on key
    o1 = torch.argsort(cat_i, dim=1, stable=True)
    key, cat_s, cat_i = key.gather(1, o1), cat_s.gather(1, o1), cat_i.gather(1, o1)
    o2 = torch.argsort(key, dim=1, stable=True)[:, :k]
    return cat_s.gather(1, o2), cat_i.gather(1, o2)
