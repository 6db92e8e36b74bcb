"""Instruction-tuning data: the template, response-only loss, partitions, the stdlib set."""

import json

import pytest
import torch

from stamen.core.errors import UserError
from stamen.core.hf import IGNORE
from stamen.core.instruct import Example, InstructionSet, jsonl_instructions, stdlib_instructions, tensorize


def test_targets_cover_the_response_only():
    ex = Example("g", "Add.", "1 2", "3")
    x, y = tensorize([ex], 64)
    text = ex.prompt() + "3"
    ids = list(text.encode()) + [0]
    assert x[0, : len(ids) - 1].tolist() == ids[:-1]
    kept = (y[0] != IGNORE).nonzero().flatten().tolist()
    # reference: positions whose next token is the response "3" or the end token
    assert kept == [len(ex.prompt()) - 1, len(ex.prompt())]
    assert y[0, kept].tolist() == [ord("3"), 0]
    x, y = tensorize([ex], 8)  # a prompt longer than the window: nothing carries loss
    assert (y == IGNORE).all() and x.shape == (1, 8)


def test_no_input_template_and_loss_ignores_masked_positions():
    from stamen.core.model import GPT, PRESETS

    ex = Example("g", "Say hi.", "", "hi")
    assert "### Input" not in ex.prompt()
    torch.manual_seed(0)
    model = GPT(PRESETS["gpt-tiny"])
    x, y = tensorize([ex, Example("g", "Say bye.", "", "bye")], 40)
    logits, loss = model(x, y)
    keep = y != IGNORE
    ref = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(loss, ref)


def test_jsonl_reads_fields_and_refuses_garbage(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "a", "input": "b", "output": "c", "user": "u1"},
        {"instruction": "d", "output": "e", "user": "u2"}]) + "\n")
    s = jsonl_instructions(p, group_field="user")
    assert s.examples == [Example("u1", "a", "b", "c"), Example("u2", "d", "", "e")]
    p.write_text('{"instruction": "a"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: needs string fields"):
        jsonl_instructions(p)
    p.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: not JSON"):
        jsonl_instructions(p)


def test_partitions_cover_every_example_once_and_follow_their_rule():
    examples = [Example(f"g{i % 5}", "t", str(i), "o") for i in range(200)]
    s = InstructionSet(examples)
    for how in ("natural", "iid", "dirichlet"):
        parts = s.partition(4, how, seed=3)
        assert sorted(e.input for p in parts for e in p.examples) == sorted(e.input for e in examples)
        assert [p.examples for p in s.partition(4, how, seed=3)] == [p.examples for p in parts]  # seeded
    natural = s.partition(4, "natural", seed=0)
    groups = [{e.group for e in p.examples} for p in natural]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:])  # no group split
    iid = s.partition(4, "iid", seed=0)
    assert [len(p.examples) for p in iid] == [50] * 4
    with pytest.raises(UserError, match="6 natural clients"):
        s.partition(6, "natural", seed=0)


def test_stdlib_set_is_signature_to_docstring_non_iid_by_package():
    s = stdlib_instructions()
    assert len(s.examples) > 1000
    by_group = {}
    for e in s.examples:
        by_group.setdefault(e.group, []).append(e)
    assert {"asyncio", "email", "json"} <= set(by_group)
    dumps = [e for e in by_group["json"] if e.input.startswith("def dumps(")]
    assert dumps and dumps[0].output.startswith("Serialize ``obj`` to a JSON formatted ``str``")
    train, val = s.split()
    assert len(val.examples) > 0 and len(train.examples) + len(val.examples) == len(s.examples)
