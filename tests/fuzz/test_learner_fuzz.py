"""``MetaLearner.adapt`` / ``predict`` / ``meta_step`` over generated task data: any number of tasks and points
(none, one, many), float16 / bfloat16 / float32 / float64, NaN and inf, non-contiguous tensors, wrong ranks and
mismatched shapes. Every input is either refused with a one-line ``ValueError`` / ``TypeError`` (or the inner
loop's divergence error) or gives finite results of the right shape; data with NaN / inf are always refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from hbmeta import GaussianLikelihood, MetaLearner, TaskBatch, mlp
from hbmeta.inference.errors import InnerLoopDivergedError

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIALS = [None, "nan", "inf", "huge", "tiny"]


def _learner(algorithm: str) -> MetaLearner:
    torch.manual_seed(0)
    return MetaLearner(mlp(), GaussianLikelihood(0.25), algorithm=algorithm)


LEARNERS = {name: _learner(name) for name in ("gem-bml+", "maml")}


@st.composite
def task_data(draw):
    tasks = draw(st.integers(0, 3))
    points = draw(st.integers(0, 6))
    features = draw(st.sampled_from([1, 1, 1, 2]))  # the net takes 1 feature; 2 must be refused
    rank = draw(st.sampled_from([3, 3, 3, 2, 4]))
    dtype = draw(st.sampled_from(DTYPES))
    special = draw(st.sampled_from(SPECIALS))
    shape = {3: (tasks, points, features), 2: (tasks, points), 4: (tasks, points, features, 1)}[rank]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = (torch.rand(shape, generator=g) * 10 - 5)
    y = torch.sin(x[..., :1]) if rank >= 3 else torch.sin(x)
    if special == "nan" and x.numel():
        x.view(-1)[0] = float("nan")
    elif special == "inf" and y.numel():
        y.view(-1)[-1] = float("inf")
    elif special == "huge":
        x, y = x * 1e30, y * 1e30
    elif special == "tiny":
        x = x * 1e-30
    x, y = x.to(dtype), y.to(dtype)
    if draw(st.booleans()) and x.dim() >= 2 and x.shape[1] > 1:  # non-contiguous: every other point
        x, y = x[:, ::2], y[:, ::2]
    finite = bool(torch.isfinite(x).all() and torch.isfinite(y).all())
    return x, y, finite


def _one_line(err: BaseException) -> None:
    assert "\n" not in str(err).strip(), str(err)


#: what the generator found (each a raw RuntimeError from deep inside the inner update before the fix)
FOUND = [(torch.tensor([[[-0.0374]]], dtype=torch.float16), torch.tensor([[[-0.0374]]], dtype=torch.float16), True),
         (torch.tensor([[[[-0.0374]], [[2.6822]]]]), torch.tensor([[[[-0.0374]], [[0.4427]]]]), True),
         (torch.tensor([[[-0.0374, 2.6822]]]), torch.tensor([[[-0.0374]]]), True)]


@given(st.sampled_from(sorted(LEARNERS)), task_data())
@example("gem-bml+", FOUND[0])
@example("maml", FOUND[1])
@example("gem-bml+", FOUND[2])
def test_adapt_and_predict_refuse_or_give_finite_results(algorithm, data):
    learner = LEARNERS[algorithm]
    x, y, finite = data
    try:
        posterior = learner.adapt(x, y, steps=2)
        pred = learner.predict(posterior, x, num_samples=4)
    except (ValueError, TypeError, InnerLoopDivergedError) as err:
        _one_line(err)
        return
    assert finite, "adapted to NaN / inf data without a word"
    assert pred.mean.shape[:2] == x.shape[:2]
    assert torch.isfinite(posterior.loc).all() and torch.isfinite(pred.mean).all()


@given(task_data())
@example(FOUND[0])
@example(FOUND[2])
def test_meta_step_refuses_or_keeps_the_prior_finite(data):
    learner = _learner("gem-bml+")
    x, y, finite = data
    try:
        info = learner.meta_step(TaskBatch(x, y, x, y), torch.Generator().manual_seed(0))
    except (ValueError, TypeError, InnerLoopDivergedError) as err:
        _one_line(err)
        return
    assert finite, "meta-trained on NaN / inf data without a word"
    assert all(torch.isfinite(p).all() for p in learner.prior.parameters()) and info["grad_norm"] == info["grad_norm"]


@pytest.mark.parametrize("case", range(len(FOUND)))
def test_what_the_generator_found_is_refused_in_one_line_naming_the_input(case):
    x, y, _ = FOUND[case]
    with pytest.raises((ValueError, TypeError), match="adapt: x") as err:
        LEARNERS["gem-bml+"].adapt(x, y, steps=1)
    _one_line(err.value)
