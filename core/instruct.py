"""Instruction-tuning data: (instruction, input, output) examples, a prompt template, the loss
on the response only, and per-client partitions.

Sources: a JSONL file with ``instruction``, ``output`` and optional ``input`` fields (and an
optional field to group by, for the natural partition), or ``stdlib``: every public function of
the Python standard library that has a docstring, as "write this function's docstring" with its
signature as input, grouped by top-level package (visibly non-IID: ``email`` documents mail,
``asyncio`` event loops). Tokens are stamen's bytes unless a tokenizer's ``encode`` is given.

A row of a batch is one example: the prompt and the response, truncated or padded to ``seq_len
+ 1`` tokens; targets are the next tokens, with prompt positions and padding set to ``IGNORE``
so only the response carries loss (FlowerTune's completion-only collator does the same).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stamen.core.data import STDLIB_SKIP
from stamen.core.errors import UserError
from stamen.core.hf import IGNORE, speaks_bytes

TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
log = logging.getLogger(__name__)
EOS_BYTE = 0  # the byte vocabulary has no end token; NUL never occurs in text
DOCSTRING_TASK = "Write the docstring of this Python function."


@dataclass(frozen=True)
class Example:
    group: str  # what the natural partition splits by
    instruction: str
    input: str
    output: str

    def prompt(self) -> str:
        t = TEMPLATE if self.input else TEMPLATE_NO_INPUT
        return t.format(instruction=self.instruction, input=self.input)


def encode_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def tensorize(examples: list[Example], seq_len: int, encode: Callable[[str], list[int]] = encode_bytes,
              eos: int = EOS_BYTE) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each ``[n, seq_len]``: prompt + response + eos, truncated or padded
    with eos; targets hold IGNORE on the prompt and the padding."""
    x = torch.full((len(examples), seq_len + 1), eos, dtype=torch.long)
    keep = torch.zeros((len(examples), seq_len + 1), dtype=torch.bool)
    for i, ex in enumerate(examples):
        prompt, response = encode(ex.prompt()), encode(ex.output) + [eos]
        ids = (prompt + response)[: seq_len + 1]
        x[i, : len(ids)] = torch.tensor(ids)
        keep[i, len(prompt): len(ids)] = True
    y = x[:, 1:].clone()
    y[~keep[:, 1:]] = IGNORE
    return x[:, :-1].contiguous(), y


@dataclass
class InstructionSet:
    examples: list[Example]

    def split(self, val_fraction: float = 0.05) -> tuple["InstructionSet", "InstructionSet"]:
        """Hold out examples by a hash of their content: stable across runs and machines."""
        def held(ex: Example) -> bool:
            key = f"{ex.group}\0{ex.instruction}\0{ex.input}".encode()
            return int(hashlib.sha1(key).hexdigest()[:8], 16) / 2**32 < val_fraction

        return (InstructionSet([e for e in self.examples if not held(e)]),
                InstructionSet([e for e in self.examples if held(e)]))

    def batches(self, batch_size: int, seq_len: int, seed: int,
                encode: Callable[[str], list[int]] = encode_bytes, eos: int = EOS_BYTE) -> Iterator:
        """An endless stream of batches sampled with a seeded generator."""
        if not self.examples:
            raise UserError("this instruction set is empty")
        rng = np.random.default_rng(seed)
        while True:
            pick = rng.integers(0, len(self.examples), batch_size)
            yield tensorize([self.examples[i] for i in pick], seq_len, encode, eos)

    def check_fits(self, seq_len: int, encode: Callable[[str], list[int]] = encode_bytes, sample: int = 1000) -> None:
        """Refuse a ``seq_len`` no prompt leaves room in for a response token (every batch
        would carry no loss and train nothing), and warn when it cuts a tenth of them or more.
        Judged on an evenly spaced sample of at most ``sample`` examples."""
        if not self.examples:
            raise UserError("this instruction set is empty")
        picked = self.examples[:: max(1, len(self.examples) // sample)]
        lengths = sorted(len(encode(ex.prompt())) for ex in picked)
        cut = sum(n > seq_len for n in lengths) / len(lengths)
        median = lengths[len(lengths) // 2]
        if cut == 1.0:
            raise UserError(f"seq_len {seq_len} is shorter than every instruction prompt ({lengths[0]}-{lengths[-1]} "
                            f"tokens, median {median}): nothing would train; raise [training] seq_len")
        if cut >= 0.1:
            log.warning(f"seq_len {seq_len} leaves no room for the response after {cut:.0%} of the instruction "
                        f"prompts (median {median} tokens): those examples train nothing; raise [training] seq_len")

    def fixed_batches(self, n_batches: int, batch_size: int, seq_len: int, seed: int = 0,
                      encode: Callable[[str], list[int]] = encode_bytes, eos: int = EOS_BYTE) -> list:
        stream = self.batches(batch_size, seq_len, seed, encode, eos)
        return [next(stream) for _ in range(n_batches)]

    def partition(self, n_clients: int, how: str, seed: int, alpha: float = 0.5) -> list["InstructionSet"]:
        """``natural``: whole groups, each to the client holding the fewest examples so far
        (largest groups first); ``iid``: a seeded shuffle dealt round-robin; ``dirichlet``: each
        group's examples spread over clients in Dir(alpha) proportions."""
        if n_clients < 1:
            raise UserError(f"need at least one client, got {n_clients}")
        rng = np.random.default_rng(seed)
        groups: dict[str, list[Example]] = {}
        for ex in self.examples:
            groups.setdefault(ex.group, []).append(ex)
        out: list[list[Example]] = [[] for _ in range(n_clients)]
        if how == "natural":
            if len(groups) < n_clients:
                raise UserError(f"{len(groups)} groups cannot make {n_clients} natural clients: use iid or dirichlet")
            for g in sorted(groups, key=lambda g: (-len(groups[g]), g)):
                min(out, key=len).extend(groups[g])
        elif how == "iid":
            for k, i in enumerate(rng.permutation(len(self.examples))):
                out[k % n_clients].append(self.examples[i])
        elif how == "dirichlet":
            for g in sorted(groups):
                exs = groups[g]
                cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients))[:-1] * len(exs)).astype(int)
                for k, part in enumerate(np.split(np.array(rng.permutation(len(exs))), cuts)):
                    out[k].extend(exs[i] for i in part)
        else:
            raise UserError(f"unknown partition {how!r}: use natural, iid or dirichlet")
        return [InstructionSet(o) for o in out]


def jsonl_instructions(path: str | Path, group_field: str | None = None) -> InstructionSet:
    """Examples from a JSONL file: ``instruction`` and ``output`` strings, ``input`` optional."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instruction file not found: {path}")
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("instruction", "output")):
            raise UserError(f"{path}:{n}: needs string fields 'instruction' and 'output'")
        if not isinstance(rec.get("input", ""), str):
            raise UserError(f"{path}:{n}: 'input' must be a string")
        group = str(rec.get(group_field, "")) if group_field else ""
        examples.append(Example(group, rec["instruction"], rec.get("input", ""), rec["output"]))
    if not examples:
        raise UserError(f"{path} holds no examples")
    return InstructionSet(examples)


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(fn, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    return f"{prefix} {fn.name}({ast.unparse(fn.args)}){returns}:"


@functools.lru_cache(maxsize=1)
def stdlib_instructions(max_output: int = 240) -> InstructionSet:
    """(signature → first paragraph of the docstring) for every public function or method of
    the standard library's own source, grouped by top-level package, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    examples = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if STDLIB_SKIP & set(rel.parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        group = rel.parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    summary = doc.strip().split("\n\n")[0].strip()[:max_output]
                    examples.append(Example(group, DOCSTRING_TASK, _signature(node), summary))
    return InstructionSet(examples)


def base_encoding(base: str) -> tuple[Callable[[str], list[int]], int]:
    """(encode, end-of-text id) for fine-tuning ``hf:PATH``: its own tokenizer, or stamen's
    bytes for a stamen model folder (``core.gpt2`` writes ``"tokenizer": "bytes"`` in its config)."""
    from stamen.core.hf import hf_folder, load_tokenizer

    folder = hf_folder(base)
    if speaks_bytes(folder):
        return encode_bytes, EOS_BYTE
    tok = load_tokenizer(folder)
    return tok.encode, tok.eos_token_id


def load_instructions(source: str, group_field: str | None = None) -> InstructionSet:
    return stdlib_instructions() if source == "stdlib" else jsonl_instructions(source, group_field)
