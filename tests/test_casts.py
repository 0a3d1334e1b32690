import sys

import numpy as np
import pytest

from model import casts


def awkward_numbers() -> np.ndarray:
    """Grid-like values and the edge cases of half floats: infinities, NaN, subnormals, signed
    zero, values beyond float16's range and ties that round to even."""
    x = (np.random.default_rng(0).standard_normal((3, 196, 488)) * 30).astype(np.float32)
    special = [np.inf, -np.inf, np.nan, 1e-8, -1e-7, 6.1e-5, -0.0, 70000.0, -65520.0, 2049.0]
    x.flat[: len(special)] = special
    return x


def bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint16 if x.dtype == np.float16 else np.uint32)


def test_casts_give_numpys_bits_both_ways():
    x = awkward_numbers()
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    half = casts.to_half(x)
    assert half.dtype == np.float16 and half.shape == x.shape
    np.testing.assert_array_equal(bits(half), bits(expected))
    back = casts.to_float(half)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(bits(back), bits(expected.astype(np.float32)))
    assert casts._session(np.dtype(np.float32), np.dtype(np.float16)) is not None  # by ORT here


def test_odd_inputs_keep_numpys_meaning():
    half = casts.to_half(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert casts.to_half(half) is half  # already float16: no copy
    assert casts.to_half(np.float32(1.5)).shape == ()
    assert casts.to_half(np.zeros((0, 4), np.float32)).shape == (0, 4)
    assert casts.to_float(np.arange(3)).dtype == np.float32  # integers: numpy's cast
    view = awkward_numbers()[:, ::2, 5:9]  # not contiguous
    with np.errstate(over="ignore"):
        expected = view.astype(np.float16)
    np.testing.assert_array_equal(casts.to_float(casts.to_half(view)), expected)


def test_without_onnxruntime_numpy_casts(monkeypatch):
    casts._session.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    try:
        assert casts._session(np.dtype(np.float32), np.dtype(np.float16)) is None
        x = awkward_numbers()
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(bits(casts.to_half(x)), bits(x.astype(np.float16)))
    finally:
        casts._session.cache_clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_domain_features_read_either_precision_alike(dtype):
    from model.domain import domain_features

    grids = np.abs(awkward_numbers()[:, :, 20:]).astype(np.float16)
    features = domain_features(grids.astype(dtype))
    expected = domain_features(grids.astype(np.float32))
    np.testing.assert_array_equal(features, expected)
