"""Grammar compilation and masking on xgrammar with the real (embedded model's) tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
import xgrammar as xgr

from strata.grammar.compiler import GrammarCompiler, GrammarError
from strata.grammar.constraint import (
    Constraint,
    constraint_from_fields,
    constraint_from_response_format,
)
from strata.model.loader import load_tokenizer, resolve_checkpoint

VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_checkpoint(None))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB, [tokenizer.eos_token_id])


def test_compiled_grammars_are_cached_by_constraint(compiler):
    c = Constraint("regex", "[0-9]{3}")
    assert compiler.compile(c) is compiler.compile(Constraint("regex", "[0-9]{3}"))
    assert compiler.compile(c) is not compiler.compile(Constraint("regex", "[0-9]{4}"))


def test_compile_timeout_and_size_limit(tokenizer):
    slow = GrammarCompiler(tokenizer, VOCAB, timeout=1e-4)
    props = {f"field_{i}": {"type": "string", "pattern": "[a-z]{2,9}"} for i in range(40)}
    with pytest.raises(GrammarError, match="took longer than"):
        slow.compile(Constraint.json_schema({"type": "object", "properties": props}))
    with pytest.raises(GrammarError, match="too large"):
        slow.compile(Constraint("regex", "a" * 100_000))


@pytest.mark.parametrize(
    "c,needle",
    [
        (Constraint("regex", "(a"), "invalid regex"),
        (Constraint("json_schema", "[1,"), "invalid JSON schema"),
        (Constraint("ebnf", "root ::= nothing"), "invalid EBNF grammar"),
    ],
)
def test_invalid_constraints_name_the_problem(compiler, c, needle):
    with pytest.raises(GrammarError, match=needle):
        compiler.compile(c)


def test_mask_allows_exactly_the_tokens_the_matcher_accepts(compiler, tokenizer):
    matchers = [
        compiler.matcher(Constraint("regex", "(yes|no)")),
        None,
        compiler.matcher(Constraint("json_object")),
    ]
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    compiler.mask_logits(logits, matchers)
    assert torch.equal(logits[1], before[1])  # unconstrained row untouched
    for row, m in ((0, matchers[0]), (2, matchers[2])):
        allowed = torch.isfinite(logits[row]).nonzero().squeeze(1).tolist()
        assert 0 < len(allowed) < VOCAB
        for t in allowed[:50]:
            assert m.accept_token(t)
            m.rollback(1)
        for t in torch.randperm(VOCAB)[:200].tolist():
            if t not in set(allowed):
                assert not m.accept_token(t)
    first = {tokenizer.decode([t]) for t in torch.isfinite(logits[0]).nonzero().squeeze(1).tolist()}
    assert all("yes".startswith(s) or "no".startswith(s) for s in first)


def test_jump_forward_string_of_a_schema(compiler):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    m = xgr.GrammarMatcher(compiler.compile(Constraint.json_schema(schema)))
    assert m.find_jump_forward_string() == '{"name": "'


def test_constraint_parsing_from_request_fields():
    assert constraint_from_fields(None, None, None) is None
    assert constraint_from_fields("a+", None, None) == Constraint("regex", "a+")
    schema = {"type": "integer"}
    assert constraint_from_fields(None, schema, None) == Constraint(
        "json_schema", json.dumps(schema)
    )
    with pytest.raises(ValueError, match="at most one"):
        constraint_from_fields("a", None, "root ::= x")
    assert constraint_from_response_format({"type": "text"}) is None
    assert constraint_from_response_format({"type": "json_object"}) == Constraint("json_object")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert constraint_from_response_format(fmt) == Constraint.json_schema(schema)
    for bad in ({"type": "json_schema"}, {"type": "yaml"}):
        with pytest.raises(ValueError, match="response_format"):
            constraint_from_response_format(bad)
