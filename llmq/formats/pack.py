"""The GPTQ checkpoint layout (and AutoAWQ's GEMM layout) as small pure functions.

llmq keeps, per linear layer of weight ``[N=out_features, K=in_features]``: ``codes`` uint8 ``[N, K]``,
``scales`` float32 ``[N, G]`` (float16 values), ``zeros`` uint8 ``[N, G]`` and ``g_idx`` int32 ``[K]``.

GPTQ layout (AutoGPTQ ``QuantLinear.pack``, GPTQModel; read by transformers, vLLM, exllama):

- ``qweight`` int32 ``[K * bits / 32, N]``: codes transposed to ``[K, N]``, packed along K.
- ``qzeros``  int32 ``[G, N * bits / 32]``: zero points ``[G, N]``, packed along N.
  ``"gptq"`` (v1) stores ``zero - 1``; ``"gptq_v2"`` stores the zero point itself.
- ``scales``  float16 ``[G, N]``; ``g_idx`` int32 ``[K]``.

Bit order: every 32 consecutive values form one little-endian bit stream of ``bits`` int32 words;
value ``i`` of the block occupies stream bits ``[i * bits, (i + 1) * bits)``, stream bit ``b`` is bit
``b % 32`` of word ``b // 32``. For 2/4/8 bits that is "value j of a word at bit offset j * bits";
for 3 bits, values 10 and 21 straddle words 0/1 and 1/2, exactly as AutoGPTQ packs them.
Words are stored as int32 two's complement (the top bit set gives a negative int32).
"""

from __future__ import annotations

from math import gcd

import torch

from llmq.errors import CheckpointError, ConfigError

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column 8 * word + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column 8 * word + p sits in nibble AWQ_REVERSE_ORDER[p]
_MASK32 = 0xFFFFFFFF


def _block(bits: int) -> tuple[int, int]:
    """(values, words) per packing block: 32/bits values in one word, or 32 values in 3 words for 3 bits."""
    if bits not in GPTQ_BITS:
        raise ConfigError(f"bits must be one of {GPTQ_BITS} to pack into int32 words, got {bits}")
    d = gcd(bits, 32)
    return 32 // d, bits // d


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits (two's complement wrap)."""
    words = words & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check_codes(values: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    """Validate integers in ``[0, 2**bits)`` (checked in their own dtype, which is cheap for uint8)."""
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ConfigError(f"{name} must be an integer tensor, got {values.dtype}")
    if values.numel():
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 2**bits - 1:
            raise ConfigError(f"{name} must lie in [0, {2**bits - 1}] for {bits} bits, got [{lo}, {hi}]")
    return values


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``[R, C]`` in ``[0, 2**bits)`` along dim 0 -> int32 ``[R * bits / 32, C]``.

    ``R`` must be a multiple of 32 / gcd(bits, 32) (32 for 3 bits, 32 / bits otherwise).
    """
    n_vals, n_words = _block(bits)
    if values.dim() != 2 or values.shape[0] % n_vals:
        raise ConfigError(f"cannot pack shape {tuple(values.shape)} at {bits} bits: "
                          f"need 2-D with rows % {n_vals} == 0")
    v = _check_codes(values, bits, "values").reshape(-1, n_vals, values.shape[1])  # [B, n_vals, C]
    words = torch.zeros(v.shape[0], n_words, v.shape[2], dtype=torch.int64, device=v.device)  # [B, W, C]
    for j in range(n_vals):
        w, off = divmod(j * bits, 32)
        x = v[:, j].to(torch.int64)  # [B, C]
        words[:, w] |= (x << off) & _MASK32
        if off + bits > 32:  # 3 bits: the high bits spill into the next word
            words[:, w + 1] |= x >> (32 - off)
    return _to_int32(words.reshape(-1, v.shape[2]))


_UNPACK_CHUNK = 1 << 18  # values decoded per step: the int32 temporaries (1 MB) stay in cache


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[rows * bits / 32, C]`` -> uint8 ``[rows, C]``.

    Closed form, one broadcast per width, no loop over bit positions: value ``j`` of a block is word
    ``j * bits // 32`` shifted right by ``j * bits % 32``; at 3 bits the two values that straddle a word
    boundary (``j`` = 10, 21) take their high bits from the next word. The shift is arithmetic (int32), so
    a straddling value's sign copies are masked off before those bits are or-ed in. Blocks are decoded a
    cache-sized chunk at a time (a whole-tensor broadcast is slower: its temporaries fault in fresh pages).
    """
    n_vals, n_words = _block(bits)
    if packed.dim() != 2 or rows % n_vals or packed.shape[0] != rows * bits // 32:
        raise CheckpointError(f"packed tensor of shape {tuple(packed.shape)} cannot hold {rows} rows "
                              f"at {bits} bits (expected ({rows * bits // 32}, C), rows % {n_vals} == 0)")
    cols = packed.shape[1]
    start = torch.arange(n_vals, device=packed.device) * bits
    word, shift = start // 32, (start % 32).to(torch.int32).view(-1, 1)
    high = (shift + bits > 32).view(-1).nonzero().view(-1)  # straddling values (3 bits only)
    kept, high_shift = (1 << (32 - shift[high])) - 1, 32 - shift[high]
    words = packed.reshape(-1, n_words, cols)  # [B, W, C]
    out = torch.empty(words.shape[0], n_vals, cols, dtype=torch.uint8, device=packed.device)
    step = max(1, _UNPACK_CHUNK // (n_vals * cols)) if packed.device.type == "cpu" else words.shape[0]
    for b in range(0, words.shape[0], step):
        w = words[b : b + step]
        values = (w if n_words == 1 else w.index_select(1, word)) >> shift  # [b, n_vals, C]
        if high.numel():
            values[:, high] = (values[:, high] & kept) | (w.index_select(1, word[high] + 1) << high_shift)
        out[b : b + step] = values & (2**bits - 1)
    return out.view(rows, cols)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``[R, C]`` along dim 1 -> int32 ``[R, C * bits / 32]`` (same bit order as rows)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: int32 ``[R, cols * bits / 32]`` -> uint8 ``[R, cols]``."""
    return unpack_rows(packed.t(), bits, cols).t().contiguous()


def can_pack(in_features: int, out_features: int, bits: int) -> bool:
    """Whether a ``[out_features, in_features]`` linear fits the GPTQ layout (both multiples of 32)."""
    return bits in GPTQ_BITS and in_features > 0 and out_features > 0 \
        and in_features % 32 == 0 and out_features % 32 == 0


def gptq_storage_bits(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bits a linear takes in the GPTQ layout: qweight, qzeros (stored even when symmetric), fp16 scales and
    int32 g_idx, as ``llmq info`` counts them."""
    groups = 1 if group_size <= 0 else -(-in_features // group_size)
    return in_features * out_features * bits + groups * out_features * (16 + bits) + 32 * in_features


def _fp16_scales(scales: torch.Tensor) -> torch.Tensor:
    s16 = scales.to(torch.float16)
    if not torch.equal(s16.to(scales.dtype), scales):
        raise ConfigError("scales must hold float16-representable values (the stored dtype is float16)")
    return s16


def pack_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              bits: int, format: str = "gptq_v2") -> dict[str, torch.Tensor]:
    """llmq's ``codes [N, K], scales [N, G], zeros [N, G], g_idx [K]`` -> GPTQ tensors.

    Returns ``qweight`` int32 ``[K*bits/32, N]``, ``qzeros`` int32 ``[G, N*bits/32]``, ``scales`` float16
    ``[G, N]``, ``g_idx`` int32 ``[K]``. ``format="gptq"`` (v1) stores ``zero - 1`` and so cannot store a
    zero point of 0; ``"gptq_v2"`` stores zero points as they are.
    """
    _block(bits)
    if format not in GPTQ_FORMATS:
        raise ConfigError(f"format must be one of {GPTQ_FORMATS}, got {format!r}")
    if codes.dim() != 2:
        raise ConfigError(f"codes must be [out_features, in_features], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if not can_pack(k, n, bits):
        raise ConfigError(f"weight of shape ({n}, {k}) cannot use the GPTQ layout: out_features and "
                          "in_features must be multiples of 32")
    if scales.dim() != 2 or scales.shape[0] != n or zeros.shape != scales.shape:
        raise ConfigError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
                          f"[{n}, n_groups]")
    if tuple(g_idx.shape) != (k,):
        raise ConfigError(f"g_idx must have shape ({k},), got {tuple(g_idx.shape)}")
    n_groups = scales.shape[1]
    gi = _check_codes(g_idx, 31, "g_idx")
    if k and int(gi.max()) >= n_groups:
        raise ConfigError(f"g_idx refers to group {int(gi.max())} but there are {n_groups} groups")
    z = _check_codes(zeros, bits, "zeros").t().to(torch.int64)  # [G, N]
    if format == "gptq":
        if bool((z == 0).any()):
            raise ConfigError('format "gptq" (v1) stores zero - 1 and cannot hold a zero point of 0: '
                              'use format="gptq_v2"')
        z = z - 1
    return {
        "qweight": pack_rows(_check_codes(codes, bits, "codes").t().contiguous(), bits),  # [K*bits/32, N]
        "qzeros": pack_cols(z, bits),  # [G, N*bits/32]
        "scales": _fp16_scales(scales).t().contiguous(),  # [G, N]
        "g_idx": gi.to(torch.int32).contiguous(),  # [K]
    }


def _expect(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtypes: tuple
            ) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"missing tensor {name!r} (expected shape {shape})")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype not in dtypes:
        raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, expected one of {dtypes}")
    return t


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, format: str, out_features: int,
                in_features: int, n_groups: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_gptq`: -> ``codes`` uint8 ``[N, K]``, ``scales`` float32 ``[N, G]``,
    ``zeros`` uint8 ``[N, G]``, ``g_idx`` int32 ``[K]``. ``G`` is taken from ``scales`` unless given.

    Raises :class:`CheckpointError` (a ``ValueError``) naming any tensor with the wrong shape or dtype.
    """
    _block(bits)
    if format not in GPTQ_FORMATS:
        raise ConfigError(f"format must be one of {GPTQ_FORMATS}, got {format!r}")
    n, k = out_features, in_features
    if not can_pack(k, n, bits):
        raise CheckpointError(f"linear ({n}, {k}) cannot be in the GPTQ layout: both must be multiples of 32")
    if n_groups is None:
        n_groups = tensors["scales"].shape[0] if "scales" in tensors and tensors["scales"].dim() == 2 else -1
    floats = (torch.float16, torch.bfloat16, torch.float32)
    ints = (torch.int32, torch.int64, torch.int16)
    qweight = _expect(tensors, "qweight", (k * bits // 32, n), (torch.int32,))
    qzeros = _expect(tensors, "qzeros", (n_groups, n * bits // 32), (torch.int32,))
    scales = _expect(tensors, "scales", (n_groups, n), floats)
    g_idx = _expect(tensors, "g_idx", (k,), ints)
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise CheckpointError(f"tensor 'g_idx' has values in [{int(g_idx.min())}, {int(g_idx.max())}], "
                              f"expected [0, {n_groups - 1}]")
    zeros = unpack_cols(qzeros, bits, n).to(torch.int64)  # [G, N]
    if format == "gptq":
        zeros = zeros + 1
        if bool((zeros > 2**bits - 1).any()):
            raise CheckpointError(f"tensor 'qzeros' decodes to a zero point of {2**bits}, outside "
                                  f"[0, {2**bits - 1}] for {bits} bits")
    return (unpack_rows(qweight, bits, k).t().contiguous(),  # [N, K]
            scales.float().t().contiguous(),  # [N, G]
            zeros.to(torch.uint8).t().contiguous(),  # [N, G]
            g_idx.to(torch.int32).contiguous())  # [K]


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int = 4
             ) -> dict[str, torch.Tensor]:
    """llmq's ``codes [N, K], zeros [N, G], scales [N, G]`` -> AutoAWQ GEMM tensors (4-bit only).

    ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[G, N/8]`` (raw zero points), ``scales`` float16
    ``[G, N]``. Packed along the OUTPUT dim: nibble ``i`` of word ``c`` holds column ``8c + AWQ_ORDER[i]``.
    Groups are contiguous (``g_idx[k] = k // group_size``); AWQ has no ``g_idx`` tensor.
    """
    if bits != 4:
        raise ConfigError(f"the AWQ GEMM layout is 4-bit only, got bits={bits}")
    if codes.dim() != 2 or codes.shape[0] % 8 or zeros.dim() != 2 or zeros.shape[0] != codes.shape[0] \
            or scales.shape != zeros.shape:
        raise ConfigError(f"cannot pack codes {tuple(codes.shape)}, zeros {tuple(zeros.shape)}, scales "
                          f"{tuple(scales.shape)} as AWQ: need [N, K], [N, G], [N, G] with N % 8 == 0")
    order = torch.tensor(AWQ_ORDER, device=codes.device)

    def interleave(x: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N], columns in AWQ nibble order
        return x.reshape(x.shape[0], -1, 8)[:, :, order].reshape(x.shape[0], -1)

    return {
        "qweight": pack_cols(interleave(_check_codes(codes, 4, "codes").t()), 4),  # [K, N/8]
        "qzeros": pack_cols(interleave(_check_codes(zeros, 4, "zeros").t()), 4),  # [G, N/8]
        "scales": _fp16_scales(scales).t().contiguous(),  # [G, N]
    }


def unpack_awq(tensors: dict[str, torch.Tensor], out_features: int, in_features: int, bits: int = 4
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_awq`: -> ``codes`` uint8 ``[N, K]``, ``scales`` float32 ``[N, G]``,
    ``zeros`` uint8 ``[N, G]`` (same order as :func:`unpack_gptq`)."""
    if bits != 4:
        raise ConfigError(f"the AWQ GEMM layout is 4-bit only, got bits={bits}")
    n, k = out_features, in_features
    if n % 8:
        raise CheckpointError(f"AWQ linear needs out_features % 8 == 0, got {n}")
    g = tensors["scales"].shape[0] if "scales" in tensors and tensors["scales"].dim() == 2 else -1
    qweight = _expect(tensors, "qweight", (k, n // 8), (torch.int32,))
    qzeros = _expect(tensors, "qzeros", (g, n // 8), (torch.int32,))
    scales = _expect(tensors, "scales", (g, n), (torch.float16, torch.bfloat16, torch.float32))
    rev = torch.tensor(AWQ_REVERSE_ORDER, device=qweight.device)

    def deinterleave(x: torch.Tensor) -> torch.Tensor:  # [R, N] nibble order -> [R, N] column order
        return x.reshape(x.shape[0], -1, 8)[:, :, rev].reshape(x.shape[0], -1)

    return (deinterleave(unpack_cols(qweight, 4, n)).t().contiguous(),  # [N, K]
            scales.float().t().contiguous(),  # [N, G]
            deinterleave(unpack_cols(qzeros, 4, n)).t().contiguous())  # [N, G]
