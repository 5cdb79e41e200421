"""Bad inputs fail before any work with one ValueError naming the argument and what was expected."""

import pytest
import torch

from retmask.kernels import masked_attention, masked_decode
from retmask.kernels.attention import masked_attention_triton
from retmask.kernels.decode import masked_decode_triton


def attn_inputs(b=2, hq=4, hkv=2, sq=5, skv=9, d=32, dtype=torch.float32):
    return (torch.randn(b, hq, sq, d, dtype=dtype), torch.randn(b, hkv, skv, d, dtype=dtype),
            torch.randn(b, hkv, skv, d, dtype=dtype))


def dec_inputs(b=2, hq=4, hkv=2, smax=9, d=32):
    return (torch.randn(b, hq, d), torch.randn(b, hkv, smax, d), torch.randn(b, hkv, smax, d),
            torch.tensor([9, 3]))


ATTN_BAD = [
    (lambda q, k, v: (q[0], k, v, {}), "q: expected rank 4"),
    (lambda q, k, v: (q, k.half(), v, {}), "k: dtype torch.float16 differs"),
    (lambda q, k, v: (q.double(), k.double(), v.double(), {}), "q: dtype torch.float64 is not supported"),
    (lambda q, k, v: (q, k[:, :, :, :16], v, {}), "k: expected shape"),
    (lambda q, k, v: (q, k, v[:, :, :4], {}), "v: expected the shape of k"),
    (lambda q, k, v: (q, k[:, :1].expand(2, 3, 9, 32), v[:, :1].expand(2, 3, 9, 32), {}), "Hq % Hkv"),
    (lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12], {}), "head dim D=12"),
    (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3], {}), "Sq <= Skv"),
    (lambda q, k, v: (q, k, v, {"keep": torch.ones(2, 3, dtype=torch.bool)}), r"keep: expected shape \(2, 4\)"),
    (lambda q, k, v: (q, k, v, {"keep": torch.ones(2, 4)}), "keep: expected dtype torch.bool"),
    (lambda q, k, v: (q, k, v, {"kv_lens": torch.tensor([9])}), "kv_lens: expected 2 entries"),
    (lambda q, k, v: (q, k, v, {"kv_lens": torch.tensor([9, 10])}), r"kv_lens: values must lie in \[0, 9\]"),
    (lambda q, k, v: (q, k, v, {"kv_lens": torch.tensor([9.0, 1.0])}), "kv_lens: expected an int32 or int64"),
    (lambda q, k, v: (q, k, v, {"window": 0}), "window: expected None or a positive int"),
    (lambda q, k, v: (q, k, v, {"scale": -1.0}), "scale: expected None or a positive finite float"),
    (lambda q, k, v: (q, k, v, {"scale": float("inf")}), "scale: expected None or a positive finite float"),
    (lambda q, k, v: (q.tolist(), k, v, {}), "q: expected a torch.Tensor"),
    (lambda q, k, v: (q[:, :0], k, v, {}), "q: expected at least one query head"),
    (lambda q, k, v: (q, k.to("meta"), v, {}), "k: on meta but q is on cpu"),
]


@pytest.mark.parametrize("fn", [masked_attention, masked_attention_triton], ids=["public", "triton"])
@pytest.mark.parametrize("bad,msg", ATTN_BAD, ids=[m for _, m in ATTN_BAD])
def test_attention_rejects(fn, bad, msg):
    q, k, v, kw = bad(*attn_inputs())
    with pytest.raises(ValueError, match=msg):
        fn(q, k, v, **kw)


def _shared(g=2, hkv=2, ssh=6, d=32):
    return dict(shared_k=torch.randn(g, hkv, ssh, d), shared_v=torch.randn(g, hkv, ssh, d),
                shared_lens=torch.tensor([6, 2]), row_seg=torch.tensor([0, -1]))


DEC_BAD = [
    (lambda q, k, v, n: (q[:, :, None], k, v, n, {}), "q: expected rank 3"),
    (lambda q, k, v, n: (q, k, v, None, {}), "kv_lens: required for decode"),
    (lambda q, k, v, n: (q, k, v, torch.tensor([0, 3]), {}), r"kv_lens: values must lie in \[1, 9\]"),
    (lambda q, k, v, n: (q, k, v[:, :, :8], n, {}), "v_cache: expected the shape of k_cache"),
    (lambda q, k, v, n: (q, k, v, n, {"keep": torch.ones(4, 2, dtype=torch.bool)}), "keep: expected shape"),
    (lambda q, k, v, n: (q, k, v, n, {"shared_k": torch.randn(1, 2, 4, 32)}), "give all four"),
    (lambda q, k, v, n: (q, k, v, n, dict(_shared(), row_seg=torch.tensor([0, 2]))),
     r"row_seg: values must lie in \[-1, 1\]"),
    (lambda q, k, v, n: (q, k, v, n, dict(_shared(), shared_lens=torch.tensor([7, 1]))),
     r"shared_lens: values must lie in \[0, 6\]"),
    (lambda q, k, v, n: (q, k, v, n, dict(_shared(), shared_k=torch.randn(2, 1, 6, 32))), "shared_k: expected shape"),
    (lambda q, k, v, n: (q, k, v, torch.tensor([9, 0]), _shared()), "shared plus private keys per row"),
    (lambda q, k, v, n: (q, k, v, n, dict(_shared(g=0), shared_lens=torch.zeros(0, dtype=torch.long))),
     r"row_seg: values must lie in \[-1, -1\]"),
    (lambda q, k, v, n: (None, k, v, n, {}), "q: expected a torch.Tensor"),
]


@pytest.mark.parametrize("fn", [masked_decode, masked_decode_triton], ids=["public", "triton"])
@pytest.mark.parametrize("bad,msg", DEC_BAD, ids=[m for _, m in DEC_BAD])
def test_decode_rejects(fn, bad, msg):
    q, k, v, n, kw = bad(*dec_inputs())
    with pytest.raises(ValueError, match=msg):
        fn(q, k, v, n, **kw)


def test_private_length_zero_is_fine_behind_a_segment():
    q, k, v, _ = dec_inputs()
    out = masked_decode(q, k, v, torch.tensor([0, 3]), **_shared())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kw,msg", [({"return_argmax": "no"}, "return_argmax: expected True or False"),
                                    ({"max_group_rows": 0}, "max_group_rows: expected None or an int >= 1"),
                                    ({"max_group_rows": "2"}, "max_group_rows"),
                                    ({"max_group_rows": 2.5}, "max_group_rows")])
def test_decode_rejects_bad_flags(kw, msg):
    q, k, v, n = dec_inputs()
    with pytest.raises(ValueError, match=msg):
        masked_decode(q, k, v, n, **kw)


def test_bfloat16_is_refused_in_the_interpreter():
    """Triton's interpreter computes bfloat16 dots wrongly: the launchers refuse them rather than return garbage."""
    q, k, v = attn_inputs(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 under TRITON_INTERPRET=1"):
        masked_attention_triton(q, k, v)
    with pytest.raises(ValueError, match="bfloat16 under TRITON_INTERPRET=1"):
        masked_decode_triton(q[:, :, 0], k, v, torch.tensor([9, 3]))


def test_strided_index_tensors_are_read_as_their_values():
    """kv_lens, keep, row_seg and shared_lens as strided views, and a pool whose last dim is strided, give what
    their contiguous copies give (the kernels index them as packed arrays). A strided row_seg once read a
    segment id from the wrong place."""
    from retmask.kernels import masked_attention_reference, masked_decode_reference

    torch.manual_seed(0)
    q, k, v = attn_inputs(b=2, hq=4, hkv=2, sq=5, skv=9)
    lens = torch.tensor([9, 0, 6, 0])[::2]
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool).t().contiguous().t()  # (2, 4), column-major
    assert not keep.is_contiguous() and not lens.is_contiguous()
    want = masked_attention_reference(q, k, v, keep.contiguous(), kv_lens=lens.contiguous())
    torch.testing.assert_close(masked_attention_triton(q, k, v, keep, kv_lens=lens), want, atol=1e-5, rtol=1e-5)
    qd, kc, vc, _ = dec_inputs()
    pool = torch.randn(2, 2, 6, 64)
    sh = dict(shared_k=pool[..., ::2], shared_v=pool[..., 1::2], shared_lens=torch.tensor([6, 9, 2, 9])[::2],
              row_seg=torch.tensor([1, 10**6, -1, 10**6])[::2])
    dlens = torch.tensor([4, 0, 3, 0])[::2]
    want = masked_decode_reference(qd, kc, vc, dlens.contiguous(), keep.contiguous(),
                                   **{n: t.contiguous() for n, t in sh.items()})
    got = masked_decode_triton(qd, kc, vc, dlens, keep, **sh)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [masked_decode, masked_decode_triton], ids=["public", "triton"])
def test_an_empty_pool_and_numpy_scalars_are_valid_input(fn, poison):
    """A pool of no segments (every row_seg -1) is a decode without one; numpy ints and floats are a window
    and a scale like Python's."""
    import numpy as np

    from retmask.kernels import masked_decode_reference

    q, k, v, n = dec_inputs()
    empty = dict(shared_k=torch.randn(0, 2, 6, 32), shared_v=torch.randn(0, 2, 6, 32),
                 shared_lens=torch.zeros(0, dtype=torch.long), row_seg=torch.tensor([-1, -1]))
    want = masked_decode_reference(q, k, v, n, window=3, scale=0.5)
    torch.testing.assert_close(fn(q, k, v, n, window=np.int64(3), scale=np.float32(0.5), **empty), want,
                               atol=1e-5, rtol=1e-5)
