"""Input checks shared by the kernels and their references.

Every public function calls one of the two `check_*` functions before any work, so a bad input
fails with one `ValueError` that names the argument, what was expected and what was given.
Checks that need the *values* of a device tensor (lengths in range, segment ids in range, block
table entries in range) cost a host sync; pass `check_values=False` in a hot loop whose inputs are
already known to be good.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .segments import segment_layout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
BLOCK_SIZES = tuple(1 << i for i in range(4, 9))  # keys per block of a paged cache: 16 .. 256


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: expected a torch.Tensor shaped {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        _fail(f"{name}: expected rank {rank} {layout}, got rank {t.dim()} shape {_shape(t)}")


def _float_dtype(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        _fail(f"{name}: dtype {t.dtype} is not supported; use float16, bfloat16 or float32")
    if like is not None and t.dtype != like.dtype:
        _fail(f"{name}: dtype {t.dtype} differs from q's {like.dtype}; cast all inputs to one dtype")


def _same_device(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.device != like.device:
        _fail(f"{name}: on {t.device} but q is on {like.device}; move every input to one device")


def _head_dim(d: int) -> None:
    if d < MIN_HEAD_DIM or d > MAX_HEAD_DIM or d % 8:
        _fail(
            f"head dim D={d} is not supported; use a multiple of 8 between "
            f"{MIN_HEAD_DIM} and {MAX_HEAD_DIM} (32, 64 and 128 are the common ones)"
        )


def _gqa(hq: int, hkv: int, kname: str) -> None:
    if hq < 1:
        _fail(f"q: expected at least one query head, got Hq={hq}")
    if hkv < 1 or hq % hkv:
        _fail(f"{kname}: {hkv} KV heads do not divide q's {hq} query heads (need Hq % Hkv == 0)")


def _keep(keep, b: int, hq: int, like: torch.Tensor) -> torch.Tensor | None:
    if keep is None:
        return None
    _tensor("keep", keep, 2, "(B, Hq)")
    if tuple(keep.shape) != (b, hq):
        _fail(f"keep: expected shape ({b}, {hq}) = (B, Hq), got {_shape(keep)}")
    if keep.dtype != torch.bool:
        _fail(f"keep: expected dtype torch.bool (False = head off), got {keep.dtype}")
    _same_device("keep", keep, like)
    return keep.contiguous()  # the kernels index it as a packed (B, Hq) array


def _lengths(name: str, t, n: int, nname: str, like: torch.Tensor) -> torch.Tensor:
    _tensor(name, t, 1, f"({nname},)")
    if t.shape[0] != n:
        _fail(f"{name}: expected {n} entries ({nname}), got {t.shape[0]}")
    if t.dtype not in (torch.int32, torch.int64):
        _fail(f"{name}: expected an int32 or int64 tensor, got {t.dtype}")
    _same_device(name, t, like)
    return t.contiguous()  # the kernels index it as a packed array


def _range(name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    if t.numel() == 0:
        return
    mn, mx = int(t.min()), int(t.max())
    if mn < lo or mx > hi:
        _fail(f"{name}: values must lie in [{lo}, {hi}] ({what}); got min {mn}, max {mx}")


def _window(window) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        _fail(f"window: expected None or a positive int (keys in (p - window, p]), got {window!r}")
    return int(window)


def _scale(scale, d: int) -> float:
    if scale is None:
        return d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf:
        _fail(f"scale: expected None or a positive finite float, got {scale!r}")
    return float(scale)


@dataclass(frozen=True)
class AttentionArgs:
    b: int
    hq: int
    hkv: int
    sq: int
    skv: int
    d: int
    keep: torch.Tensor | None
    kv_lens: torch.Tensor | None
    window: int | None
    scale: float


def check_attention(q, k, v, keep, kv_lens, window, scale, check_values=True) -> AttentionArgs:
    _tensor("q", q, 4, "(B, Hq, Sq, D)")
    _tensor("k", k, 4, "(B, Hkv, Skv, D)")
    _tensor("v", v, 4, "(B, Hkv, Skv, D)")
    _float_dtype("q", q)
    _float_dtype("k", k, q)
    _float_dtype("v", v, q)
    _same_device("k", k, q)
    _same_device("v", v, q)
    b, hq, sq, d = q.shape
    _head_dim(d)
    if k.shape[0] != b or k.shape[3] != d:
        _fail(f"k: expected shape ({b}, Hkv, Skv, {d}) to match q {_shape(q)}, got {_shape(k)}")
    if tuple(v.shape) != tuple(k.shape):
        _fail(f"v: expected the shape of k {_shape(k)}, got {_shape(v)}")
    hkv, skv = k.shape[1], k.shape[2]
    _gqa(hq, hkv, "k")
    if sq < 1 or skv < sq:
        _fail(f"q/k: need 1 <= Sq <= Skv (queries are the last Sq of Skv keys), got Sq={sq}, Skv={skv}")
    keep = _keep(keep, b, hq, q)
    if kv_lens is not None:
        kv_lens = _lengths("kv_lens", kv_lens, b, "B", q)
        if check_values:
            _range("kv_lens", kv_lens, 0, skv, "valid keys per row, at most Skv")
    return AttentionArgs(b, hq, hkv, sq, skv, d, keep, kv_lens, _window(window), _scale(scale, d))


@dataclass(frozen=True)
class DecodeArgs:
    b: int
    hq: int
    hkv: int
    smax: int  # keys a row's private cache can hold: Smax, or NBp * Bs for a paged cache
    d: int
    keep: torch.Tensor | None
    kv_lens: torch.Tensor
    window: int | None
    scale: float
    shared: "SharedArgs | None"
    table: torch.Tensor | None = None  # (B, NBp) block table of a paged private cache; None: contiguous
    bs: int = 0  # keys per block of the paged private cache (0: contiguous)


@dataclass(frozen=True)
class SharedArgs:
    k: torch.Tensor  # (G, Hkv, Ssh, D), or a block pool (NB, Hkv, Bs, D) read through `table`
    v: torch.Tensor  # shaped as k
    lens: torch.Tensor  # (G,)
    seg: torch.Tensor  # (B,) segment of each row, -1 for none
    n_seg: int
    ssh: int  # keys a segment can hold: Ssh, or NBs * Bs when paged
    table: torch.Tensor | None = None  # (G, NBs) block table of the segments; None: contiguous segments
    bs: int = 0  # keys per block of the paged segments (0: contiguous)


def _block_size(name: str, pool: torch.Tensor) -> int:
    bs = pool.shape[2]
    if bs not in BLOCK_SIZES:
        _fail(f"{name}: block size Bs={bs} (dim 2 of the block pool {_shape(pool)} = (NB, Hkv, Bs, D)) is not "
              f"supported; use a power of two from {BLOCK_SIZES[0]} to {BLOCK_SIZES[-1]}")
    return bs


def _table(name: str, t, n: int, nname: str, like: torch.Tensor) -> torch.Tensor:
    _tensor(name, t, 2, f"({nname}, blocks)")
    if t.shape[0] != n:
        _fail(f"{name}: expected {n} rows ({nname}), one list of block ids each, got shape {_shape(t)}")
    if t.dtype not in (torch.int32, torch.int64):
        _fail(f"{name}: expected an int32 (or int64) tensor of block ids, got {t.dtype}; convert it with .int()")
    _same_device(name, t, like)
    return t if t.stride(-1) == 1 else t.contiguous()  # the kernels step over a row's entries with stride 1


def _table_entries(name: str, table: torch.Tensor, lens: torch.Tensor, bs: int, nb: int, pool: str) -> None:
    """Every entry a row of `table` reads (its first ceil(lens / bs)) names a block of the pool: one host sync."""
    if table.numel() == 0:
        return
    used = torch.arange(table.shape[1], device=table.device)[None, :] < (lens.long()[:, None] + bs - 1) // bs
    bad = used & ((table < 0) | (table >= nb))  # (rows, blocks)
    if bool(bad.any()):
        r, c = bad.nonzero()[0].tolist()
        _fail(f"{name}: entry [{r}, {c}] = {int(table[r, c])} is read (it holds keys below the row's length) but "
              f"is not a block of {pool} ({nb} blocks); every block id a row reads must lie in [0, {nb})")


def check_decode(
    q, k_cache, v_cache, kv_lens, keep, window, scale, shared_k, shared_v, shared_lens, row_seg,
    check_values=True, seg_layout=None, block_table=None, shared_table=None,
) -> DecodeArgs:
    paged = block_table is not None
    cache_layout = "(NB, Hkv, Bs, D) block pool" if paged else "(B, Hkv, Smax, D)"
    _tensor("q", q, 3, "(B, Hq, D)")
    _tensor("k_cache", k_cache, 4, cache_layout)
    _tensor("v_cache", v_cache, 4, cache_layout)
    _float_dtype("q", q)
    _float_dtype("k_cache", k_cache, q)
    _float_dtype("v_cache", v_cache, q)
    _same_device("k_cache", k_cache, q)
    _same_device("v_cache", v_cache, q)
    b, hq, d = q.shape
    _head_dim(d)
    table, bs = None, 0
    if paged:
        if k_cache.shape[3] != d:
            _fail(f"k_cache: expected a block pool shaped (NB, Hkv, Bs, {d}) to match q {_shape(q)}, "
                  f"got {_shape(k_cache)}")
    elif k_cache.shape[0] != b or k_cache.shape[3] != d:
        _fail(f"k_cache: expected shape ({b}, Hkv, Smax, {d}) to match q {_shape(q)}, got {_shape(k_cache)}")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        _fail(f"v_cache: expected the shape of k_cache {_shape(k_cache)}, got {_shape(v_cache)}")
    hkv, smax = k_cache.shape[1], k_cache.shape[2]
    _gqa(hq, hkv, "k_cache")
    if paged:
        bs = _block_size("k_cache", k_cache)
        table = _table("block_table", block_table, b, "B", q)
        smax = table.shape[1] * bs  # keys a row's table can address
    if kv_lens is None:
        _fail("kv_lens: required for decode, a (B,) int tensor of valid cache lengths per row")
    kv_lens = _lengths("kv_lens", kv_lens, b, "B", q)
    keep = _keep(keep, b, hq, q)
    given = [x is not None for x in (shared_k, shared_v, shared_lens, row_seg)]
    shared = None
    if any(given) and not all(given):
        _fail("shared_k, shared_v, shared_lens, row_seg: give all four for a shared segment, or none")
    if shared_table is not None and not all(given):
        _fail("shared_table: given without a shared segment (shared_k, shared_v, shared_lens, row_seg); pass "
              "those too, or drop it")
    if all(given) and paged and shared_table is None:
        _fail("shared_table: required with block_table when shared segments are read (both caches are paged or "
              "neither); pass the segments' (G, NBs) block table, or give contiguous caches and no block_table")
    if shared_table is not None and not paged:
        _fail("block_table: required with shared_table (both caches are paged or neither); pass the rows' "
              "(B, NBp) block table, or give contiguous segments and no shared_table")
    if all(given):
        seg_layout_s = "(NB, Hkv, Bs, D) block pool" if paged else "(G, Hkv, Ssh, D)"
        _tensor("shared_k", shared_k, 4, seg_layout_s)
        _tensor("shared_v", shared_v, 4, seg_layout_s)
        _float_dtype("shared_k", shared_k, q)
        _float_dtype("shared_v", shared_v, q)
        _same_device("shared_k", shared_k, q)
        _same_device("shared_v", shared_v, q)
        if shared_k.shape[1] != hkv or shared_k.shape[3] != d:
            want = f"(NB, {hkv}, Bs, {d})" if paged else f"(G, {hkv}, Ssh, {d})"
            _fail(f"shared_k: expected shape {want} to match k_cache, got {_shape(shared_k)}")
        if tuple(shared_v.shape) != tuple(shared_k.shape):
            _fail(f"shared_v: expected the shape of shared_k {_shape(shared_k)}, got {_shape(shared_v)}")
        sh_table, sh_bs = None, 0
        if paged:
            sh_bs = _block_size("shared_k", shared_k)
            _tensor("shared_table", shared_table, 2, "(G, blocks)")
            g = shared_table.shape[0]  # the table's rows are the segments
            sh_table = _table("shared_table", shared_table, g, "G", q)
            ssh = sh_table.shape[1] * sh_bs  # keys a segment's table can address
        else:
            g, ssh = shared_k.shape[0], shared_k.shape[2]
        shared_lens = _lengths("shared_lens", shared_lens, g, "G", q)
        row_seg = _lengths("row_seg", row_seg, b, "B", q)
        # the kernels step over the pool's last dim with stride 1
        shared_k = shared_k if shared_k.stride(-1) == 1 else shared_k.contiguous()
        shared_v = shared_v if shared_v.stride(-1) == 1 else shared_v.contiguous()
        shared = SharedArgs(shared_k, shared_v, shared_lens, row_seg, g, ssh, sh_table, sh_bs)
    if seg_layout is not None:
        if shared is None:
            _fail("seg_layout: given without a shared segment (shared_k, shared_v, shared_lens, row_seg)")
        if not isinstance(seg_layout, tuple) or len(seg_layout) != 3:
            _fail("seg_layout: expected (order, starts, counts) as retmask.kernels.segment_layout returns")
        for name, t, n, nn in zip(("order", "starts", "counts"), seg_layout, (b, shared.n_seg, shared.n_seg),
                                  ("B", "G", "G")):
            _tensor(f"seg_layout.{name}", t, 1, f"({nn},)")
            if t.shape[0] != n or t.dtype != torch.int32 or not t.is_contiguous():
                _fail(f"seg_layout.{name}: expected a contiguous int32 tensor of {n} entries ({nn}), got "
                      f"{t.dtype} {_shape(t)}; build it with retmask.kernels.segment_layout(row_seg, {shared.n_seg})")
            _same_device(f"seg_layout.{name}", t, q)
        if check_values:
            want = segment_layout(shared.seg, shared.n_seg)
            if not all(torch.equal(x, y) for x, y in zip(seg_layout, want)):
                _fail("seg_layout: does not match row_seg; recompute it with segment_layout(row_seg, G) whenever "
                      "row_seg changes")
    if check_values:
        smax_name = "NBp * Bs, the keys block_table addresses" if paged else "Smax"
        if shared is None:
            _range("kv_lens", kv_lens, 1, smax, f"each row needs at least its new token, at most {smax_name}")
        else:
            ssh_name = "NBs * Bs, the keys shared_table addresses" if paged else "Ssh"
            _range("kv_lens", kv_lens, 0, smax, f"private keys per row, at most {smax_name}")
            _range("shared_lens", shared.lens, 0, shared.ssh, f"valid keys per segment, at most {ssh_name}")
            _range("row_seg", shared.seg, -1, shared.n_seg - 1, "segment index per row, -1 for none")
            seg_len = torch.where(  # (an empty pool: every row_seg is -1, checked above)
                shared.seg >= 0, shared.lens[shared.seg.clamp(min=0).long()], shared.lens.new_zeros(())
            ) if shared.n_seg else torch.zeros_like(kv_lens)
            _range("kv_lens", kv_lens + seg_len, 1, smax + shared.ssh, "shared plus private keys per row")
            if shared.table is not None:  # only the segments some row reads are read
                read = torch.zeros(shared.n_seg, dtype=torch.bool, device=q.device)
                read[shared.seg[shared.seg >= 0].long()] = True
                _table_entries("shared_table", shared.table, torch.where(read, shared.lens, 0), shared.bs,
                               shared.k.shape[0], "shared_k/shared_v")
        if table is not None:
            _table_entries("block_table", table, kv_lens, bs, k_cache.shape[0], "k_cache/v_cache")
    return DecodeArgs(b, hq, hkv, smax, d, keep, kv_lens, _window(window), _scale(scale, d), shared, table, bs)


def _integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def check_decode_flags(return_argmax, max_group_rows) -> None:
    """The decode flags the backends read differently (the reference ignores max_group_rows)."""
    if not isinstance(return_argmax, bool):
        _fail(f"return_argmax: expected True or False, got {return_argmax!r}")
    m = max_group_rows
    if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1):
        _fail(f"max_group_rows: expected None or an int >= 1 (rows sharing one segment), got {max_group_rows!r}")


def check_sampling(logits, seed, step, inv_t, floor):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a (B, V) float tensor, got {got}")
    b = logits.shape[0]
    if logits.shape[1] < 1:
        raise ValueError(f"logits: expected at least one token (V >= 1), got shape {_shape(logits)}")
    for name, t in (("seed", seed), ("step", step)):
        if not isinstance(t, torch.Tensor) or t.shape != (b,) or not _integer(t):
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a ({b},) integer tensor (one per row of logits), got {got}")
    if isinstance(inv_t, bool) or not isinstance(inv_t, numbers.Real) or not 0 < inv_t < math.inf:
        raise ValueError(f"inv_t={inv_t!r}: must be a positive finite number (1 / temperature)")
    if floor is not None and (not isinstance(floor, torch.Tensor) or floor.shape != (b,)
                              or floor.dtype.is_complex or floor.dtype == torch.bool):
        got = f"{tuple(floor.shape)} {floor.dtype}" if isinstance(floor, torch.Tensor) else type(floor).__name__
        raise ValueError(f"floor: expected a ({b},) real tensor of per-row score floors or None, got {got}")
