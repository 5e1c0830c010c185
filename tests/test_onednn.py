"""oneDNN's matmul as a JAX FFI call (koclip.modeling.onednn): numerics against numpy, the encoders
with it on and off, and the fallback to XLA's dot when it cannot be built."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koclip.config import tiny_config
from koclip.modeling import KoCLIP, onednn

built = onednn.load()
needs_onednn = pytest.mark.skipif(not built["available"], reason=f"oneDNN matmul unavailable: {built['reason']}")

SHAPES = [(1, 1, 1), (7, 13, 5), (64, 96, 48), (33, 100, 257), (200, 768, 64)]


def bf16_round(a: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


# KOCLIP_ONEDNN_PARTS: oneDNN's own threads (0), or 2 or 3 blocks of rows on XLA's pool and the caller.
PARTS = ["0", "2", "3"]


@needs_onednn
@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_float32_matmul_matches_numpy(m, k, n, parts, monkeypatch):
    monkeypatch.setenv("KOCLIP_ONEDNN_PARTS", parts)  # read when traced: a new lambda traces anew
    rng = np.random.default_rng(m * 1000 + k + n)
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    got = np.asarray(jax.jit(lambda a, c: onednn.matmul(a, c))(jnp.asarray(x), jnp.asarray(w)))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.dtype == np.float32 and got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_onednn
@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bfloat16_matmul_accumulates_in_float32(m, k, n, parts, monkeypatch):
    monkeypatch.setenv("KOCLIP_ONEDNN_PARTS", parts)
    rng = np.random.default_rng(m * 1000 + k + n)
    x, w = bf16_round(rng.standard_normal((m, k), np.float32)), bf16_round(rng.standard_normal((k, n), np.float32))
    b = bf16_round(rng.standard_normal(n, np.float32))
    want = x.astype(np.float64) @ w.astype(np.float64)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    # float32 result: the exact products of bf16 inputs summed in float32.
    f32 = np.asarray(jax.jit(lambda a, c, d: onednn.matmul_bias(a, c, d, jnp.float32))(xb, wb, jnp.asarray(b, jnp.bfloat16)))
    np.testing.assert_allclose(f32, want + b, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    # bfloat16 result (what the dense layers use): rounded once, so within one bf16 step (2^-8 relative).
    out = jax.jit(lambda a, c: onednn.matmul(a, c))(xb, wb)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, rtol=2 ** -8, atol=1e-5 * np.sqrt(k))


@needs_onednn
def test_leading_dims_and_gradient_match_xla():
    rng = np.random.default_rng(3)
    x, w = jnp.asarray(rng.standard_normal((2, 5, 24), np.float32)), jnp.asarray(rng.standard_normal((24, 16), np.float32))
    got = onednn.matmul(x, w)
    assert got.shape == (2, 5, 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ w), rtol=1e-5, atol=1e-5)
    loss = lambda f: jax.grad(lambda a, c: (f(a, c) ** 2).sum(), argnums=(0, 1))(x, w)
    for ours, xla in zip(loss(onednn.matmul), loss(lambda a, c: a @ c)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), rtol=1e-4, atol=1e-4)


def test_mismatched_dtypes_are_refused():
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        onednn.matmul(jnp.ones((2, 3), jnp.float32), jnp.ones((3, 4), jnp.bfloat16))


def encoder_inputs(model: KoCLIP, batch: int = 3):
    ids, mask, pixels = model.dummy_inputs(batch)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 60, ids.shape), jnp.int32)
    mask = mask.at[1, ids.shape[1] // 2:].set(0)
    return ids, mask, jnp.asarray(rng.standard_normal(pixels.shape), jnp.float32)


@needs_onednn
@pytest.mark.parametrize("text", ["roberta", "bert", "clip_text_model"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_encoders_match_with_onednn_on_and_off(text, dtype, tol):
    config = tiny_config(text)
    on, off = KoCLIP(config, dtype, "onednn"), KoCLIP(config, dtype, "xla")
    params = on.cast_params(KoCLIP(config).init(0))
    ids, mask, pixels = encoder_inputs(on)
    for method, args in (("encode_text", (ids, mask)), ("encode_image", (pixels,)), ("encode_patches", (pixels,))):
        with_onednn, with_xla = jax.jit(getattr(on, method)), jax.jit(getattr(off, method))
        assert "koclip_onednn_matmul" in with_onednn.lower(params, *args).as_text()
        assert "koclip_onednn_matmul" not in with_xla.lower(params, *args).as_text()
        diff = np.abs(np.asarray(with_onednn(params, *args)) - np.asarray(with_xla(params, *args))).max()
        assert diff <= tol, (method, diff)


@needs_onednn
def test_training_keeps_xlas_dot():
    model = KoCLIP(tiny_config("roberta"), "float32", "onednn")
    params = model.init(0)
    hlo = jax.jit(model.contrastive_logits).lower(params, *encoder_inputs(model)).as_text()
    assert "koclip_onednn_matmul" not in hlo


def test_a_missing_library_falls_back_to_xla(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_state", {})  # forget this process's build
    monkeypatch.setenv("KOCLIP_ONEDNN_ROOT", str(tmp_path))  # no oneDNN there
    status = onednn.status("auto")
    assert status["matmul"] == "xla" and "oneDNN not installed" in status["reason"]
    with pytest.raises(RuntimeError, match="oneDNN not installed"):
        onednn.status("onednn")
    model = KoCLIP(tiny_config("roberta"), "float32", "auto")
    params = model.init(0)
    ids, mask, _ = encoder_inputs(model)
    fn = jax.jit(model.encode_text)
    assert "koclip_onednn_matmul" not in fn.lower(params, ids, mask).as_text()
    assert np.all(np.isfinite(np.asarray(fn(params, ids, mask))))


@needs_onednn
def test_a_failed_build_falls_back_to_xla(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_state", {})
    monkeypatch.setenv("KOCLIP_CACHE", str(tmp_path))  # a fresh cache: the build runs
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    status = onednn.status("auto")
    assert status["matmul"] == "xla" and "false failed" in status["reason"]
    assert not list((tmp_path / "onednn").glob("*.so"))


def test_settings_are_checked(monkeypatch):
    assert onednn.status("xla")["matmul"] == "xla"
    monkeypatch.setenv("KOCLIP_MATMUL", "xla")
    assert KoCLIP(tiny_config("roberta")).matmul == "xla"
    with pytest.raises(ValueError, match="expected one of auto, onednn, xla"):
        KoCLIP(tiny_config("roberta"), "float32", "mkl")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_uses_onednn_for_the_measured_dtypes_only(dtype):
    model = KoCLIP(tiny_config("roberta"), dtype, "auto")
    params = model.cast_params(KoCLIP(tiny_config("roberta")).init(0))
    ids, mask, _ = encoder_inputs(model)
    hlo = jax.jit(model.encode_text).lower(params, ids, mask).as_text()
    expected = onednn.status("auto")["matmul"] == "onednn" and dtype in onednn.AUTO_DTYPES
    assert ("koclip_onednn_matmul" in hlo) == expected


def test_dense_activation_has_nn_denses_parameters():
    import flax.linen as nn

    from koclip.modeling.layers import DenseActivation, activation

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 12)), jnp.float32)
    ours = DenseActivation(20, "gelu", name="fc")
    theirs = nn.Dense(20, name="fc")
    p_ours, p_theirs = ours.init(jax.random.PRNGKey(3), x), theirs.init(jax.random.PRNGKey(3), x)
    assert jax.tree_util.tree_structure(p_ours) == jax.tree_util.tree_structure(p_theirs)
    for a, b in zip(jax.tree_util.tree_leaves(p_ours), jax.tree_util.tree_leaves(p_theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p_theirs = jax.tree_util.tree_map(lambda a: a + 0.1, p_theirs)  # a nonzero bias
    np.testing.assert_array_equal(np.asarray(ours.apply(p_theirs, x)),
                                  np.asarray(activation("gelu")(theirs.apply(p_theirs, x))))


@needs_onednn
@pytest.mark.parametrize("act", sorted(onednn.POST_OPS))
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_fused_activation_matches_xla(act, dtype, tol):
    rng = np.random.default_rng(5)
    x, w, b = (jnp.asarray(rng.standard_normal(s) * c, dtype) for s, c in (((3, 7, 40), 1.0), ((40, 24), 0.2), (24, 1.0)))
    from koclip.modeling.layers import activation

    fn = activation(act)
    got = jax.jit(lambda *a: onednn.dense_activation(*a, act, fn))(x, w, b)
    want = onednn._dense_act_reference(x, w, b, fn)
    assert got.dtype == x.dtype and got.shape == (3, 7, 24)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    grad = jax.grad(lambda a: onednn.dense_activation(a, w, b, act, fn).astype(jnp.float32).sum())(x)
    want_grad = jax.grad(lambda a: onednn._dense_act_reference(a, w, b, fn).astype(jnp.float32).sum())(x)
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32), rtol=tol, atol=tol)
