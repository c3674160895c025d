from __future__ import annotations

import pytest
import torch

from strata.sampling import sampler
from strata.sampling.params import SamplingParams
from strata.sampling.sampler import SampleInput, sample
from strata.sampling.stop import StopMatcher


def inp(params: SamplingParams, out=(), prompt=(1, 2)) -> SampleInput:
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    return SampleInput(params, list(prompt), list(out), gen)


def test_greedy_and_top_k_1_take_the_argmax():
    logits = torch.randn(3, 50)
    reqs = [
        inp(SamplingParams(temperature=0)),
        inp(SamplingParams(top_k=1)),
        inp(SamplingParams(temperature=0.7, top_k=1)),
    ]
    assert sample(logits, reqs).tokens == logits.argmax(-1).tolist()


def test_greedy_is_torchs_argmax_with_ties_nan_and_strides():
    logits = torch.randn(6, 49152)
    logits[1, [7, 300, 49000]] = 50.0  # ties: the first
    logits[2, [11, 4000]] = float("nan")  # NaN counts as the max: the first
    logits[3] = 0.0
    logits[4, -1] = float("inf")
    for x in (logits, logits[::2], logits[:, :1000], logits.t().contiguous().t()):
        assert sampler.argmax_rows(x).tolist() == x.argmax(-1).tolist()


def test_same_seed_same_tokens_whatever_the_batch():
    logits = torch.randn(1, 1000)
    p = SamplingParams(temperature=1.0, seed=123)
    alone = [sample(logits, [inp(p)]).tokens[0] for _ in range(1)]
    batch = torch.cat([torch.randn(5, 1000), logits])
    others = [inp(SamplingParams(temperature=1.0)) for _ in range(5)]
    together = sample(batch, [*others, inp(p)]).tokens[-1]
    assert alone[0] == together
    assert (
        len({sample(logits, [inp(SamplingParams(temperature=5.0))]).tokens[0] for _ in range(30)})
        > 1
    )


def test_sampling_follows_the_distribution_and_filters():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = [sample(logits, [inp(SamplingParams(temperature=1.0))]).tokens[0] for _ in range(2000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / 2000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)
    for params, allowed in [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.7), {0, 1}),
        (SamplingParams(min_p=0.4), {0, 1}),
    ]:
        got = {sample(logits, [inp(params)]).tokens[0] for _ in range(300)}
        assert got == allowed, (params, got)


def test_penalties_push_repeated_tokens_down():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    plain = sample(logits, [inp(SamplingParams(temperature=0), out=[0])]).tokens[0]
    assert plain == 0
    for p in [
        SamplingParams(temperature=0, frequency_penalty=0.5),
        SamplingParams(temperature=0, presence_penalty=0.5),
        SamplingParams(temperature=0, repetition_penalty=1.2),
    ]:
        assert sample(logits, [inp(p, out=[0], prompt=[2])]).tokens[0] == 1


def test_logprobs_of_chosen_and_top_tokens():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    out = sample(logits, [inp(SamplingParams(temperature=0, logprobs=True, top_logprobs=2))])
    assert out.logprobs == pytest.approx([torch.log(torch.tensor(0.6)).item()], abs=1e-6)
    assert out.top_ids == [[0, 1]]


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(max_new_tokens=0),
        dict(top_logprobs=50),
        dict(stop=("",)),
    ],
)
def test_bad_sampling_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_strings_are_never_split_across_chunks():
    m = StopMatcher(["END", "\n\n"])
    chunks = ["Hello E", "N", "x and E", "ND more"]
    out = [m.feed(c) for c in chunks]
    assert out == ["Hello ", "", "ENx and ", ""]
    assert m.stopped and "".join(out) == "Hello ENx and "
    m2 = StopMatcher(["stop"])
    assert m2.feed("ends with st") == "ends with " and m2.flush() == "st"


def test_logit_bias_moves_tokens_and_travels_through_the_protos():
    from services.convert import params_from_proto, params_to_proto

    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0], [5.0, 1.0, 0.0, -1.0]])
    forced = SamplingParams(temperature=0, logit_bias=((3, 100.0),))
    banned = SamplingParams(temperature=0, logit_bias=((0, -100.0),))
    out = sample(logits, [inp(forced), inp(banned)])
    assert out.tokens == [3, 1]
    assert logits[0, 3] == -1.0  # the caller's logits are left alone
    assert params_from_proto(params_to_proto(forced)) == forced
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),))


@pytest.mark.parametrize("u", [0.0, 0.3, 1.0 - 2**-24])
def test_a_draw_never_lands_on_a_token_without_mass(monkeypatch, u):
    """The inverse-CDF draw at the ends of [0, 1): zero-probability tokens before, between
    and after the ones with mass (as a filter leaves them) are never chosen."""
    probs = torch.tensor([[0.0, 0.0, 0.7, 0.0, 0.3, 0.0, 0.0], [0.0] * 6 + [1.0]])
    monkeypatch.setattr(sampler, "_uniform", lambda reqs, device: torch.full((2, 1), u))
    pick = sampler._draw(probs, [None, None]).tolist()
    assert probs[0, pick[0]] > 0 and pick[1] == 6
    assert pick[0] == (2 if u < 0.7 else 4)


def test_retention_priority_travels_through_the_apis_and_is_checked():
    from gateway.protocol import ChatCompletionRequest, GenerateRequest
    from services.convert import params_from_proto, params_to_proto

    held = SamplingParams(priority=7, priority_ttl=30.0)
    assert params_from_proto(params_to_proto(held)) == held
    assert params_from_proto(params_to_proto(SamplingParams())).priority_ttl == 600.0
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "priority": 7, "priority_ttl": 30}
    )
    assert (chat.params().priority, chat.params().priority_ttl) == (7, 30.0)
    gen = GenerateRequest.model_validate({"text": "hi", "sampling_params": {"priority": 3}})
    assert gen.params().priority == 3
    for bad in ({"priority": 101}, {"priority_ttl": 0}):
        with pytest.raises(ValueError, match="priority"):
            SamplingParams(**bad)
