"""A scalar, pure-Python Philox4x32-10 and Box-Muller: the oracle of the noise ops.

Written from the Random123 paper (Salmon et al., SC 2011) with Python's unbounded
integers and ``math``, independently of ``riskfast.ops.philox`` (no torch, no
riskfast import). ``KNOWN_ANSWERS`` are Random123's published test vectors for
philox4x32_10 (file ``kat_vectors``), which check this oracle itself.
"""

from __future__ import annotations

import math
import struct

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85

# (counter words, key words) -> output words
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def philox(counter, key, rounds=10):
    c = list(counter)
    k0, k1 = key
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + W0) % 2**32
            k1 = (k1 + W1) % 2**32
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        hi0, lo0 = p0 // 2**32, p0 % 2**32
        hi1, lo1 = p1 // 2**32, p1 % 2**32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return tuple(c)


def f32(x: float) -> float:
    """Round a Python float to the nearest float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def normal(n: int, seed: int) -> float:
    """Element ``n`` of the stream of ``seed`` (layout: ``riskfast.ops.philox``'s docstring).

    Box-Muller in float64 math on the float32 uniforms; the float32 implementations
    agree with it to a few float32 ulps (the tests state the bound).
    """
    block, lane = divmod(n, 4)
    words = philox((block % 2**32, block // 2**32, 0, 0), (seed % 2**32, seed // 2**32))
    uniforms = [(2 * (w // 2**9) + 1) / 2**24 for w in words]
    pair = lane // 2
    v_radius, v_angle = uniforms[2 * pair], uniforms[2 * pair + 1]
    radius = math.sqrt(-2.0 * math.log(v_radius))
    angle = f32(v_angle * f32(2 * math.pi))
    return radius * (math.cos(angle) if lane % 2 == 0 else math.sin(angle))
