"""run_session: many samples run in chunks (bounded memory) with the same outputs as one run."""

import numpy as np

from edgec.testing import graph
from edgec.verify import RUN_BATCH, ort_session, run_session


class Counted:
    """A real onnxruntime session that records the batch of each run."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        self.batches.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)


def _session(signature: str, body: str) -> Counted:
    return Counted(ort_session(graph(signature, body)))


def test_a_dynamic_batch_runs_in_chunks_with_the_outputs_of_one_run():
    x = np.random.default_rng(0).normal(size=(2 * RUN_BATCH + 22, 4)).astype(np.float32)
    session = _session("g (float[N,4] x) => (float[N,4] y, float[N] s)", "y = Relu(x)\ns = ReduceSum <keepdims: int = 0> (x, one)\none = Constant <value: tensor = int64[1] {1}> ()")
    out = run_session(session, {"x": x, "unused": x})
    assert session.batches == [RUN_BATCH, RUN_BATCH, 22]
    np.testing.assert_array_equal(out["y"], np.maximum(x, 0))
    np.testing.assert_allclose(out["s"], x.sum(axis=1), rtol=1e-6)


def test_an_output_without_the_batch_axis_runs_everything_at_once():
    x = np.ones((RUN_BATCH + 1, 4), np.float32)
    session = _session("g (float[N,4] x) => (float[4] t)", "t = ReduceSum <keepdims: int = 0> (x, zero)\nzero = Constant <value: tensor = int64[1] {0}> ()")
    out = run_session(session, {"x": x})
    assert session.batches == [RUN_BATCH + 1]
    np.testing.assert_array_equal(out["t"], np.full(4, RUN_BATCH + 1, np.float32))


def test_a_fixed_batch_runs_in_chunks_of_it():
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    session = _session("g (float[2,4] x) => (float[2,4] y)", "y = Neg(x)")
    out = run_session(session, {"x": x})
    assert session.batches == [2, 2, 2]
    np.testing.assert_array_equal(out["y"], -x)


def test_a_dim_that_is_not_the_batch_everywhere_is_not_cut():
    # y's dim 0 is x's dim 1: cutting x's samples would cut y's other axis.
    x = np.arange((RUN_BATCH + 8) * 3, dtype=np.float32).reshape(RUN_BATCH + 8, 3)
    session = _session("g (float[N,S] x) => (float[S,N] y)", "y = Transpose(x)")
    out = run_session(session, {"x": x})
    assert session.batches == [RUN_BATCH + 8]
    np.testing.assert_array_equal(out["y"], x.T)


def test_a_session_for_timing_in_turn_does_not_spin():
    model = graph("g (float[N,4] x) => (float[N,4] y)", "y = Relu(x)")
    quiet, default = ort_session(model, spinning=False), ort_session(model)

    def spinning(session) -> str | None:
        try:
            return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except Exception:  # not set: onnxruntime's default, spinning
            return None

    assert spinning(quiet) == "0" and spinning(default) in (None, "1")
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 4
    np.testing.assert_array_equal(run_session(quiet, {"x": x})["y"], run_session(default, {"x": x})["y"])
