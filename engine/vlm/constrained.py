"""Constrained decoding with xgrammar: a grammar is checked where the task is set up (no model needed), compiled
once per model against its tokenizer, and applied through a fresh transformers logits processor per batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class GrammarError(ValueError):
    """The constrained decoder cannot enforce this schema or grammar; the message says what it rejected."""


@dataclass(frozen=True)
class Grammar:
    kind: Literal["json_schema", "ebnf"]
    source: str

    def parsed(self):
        """The xgrammar Grammar; raises GrammarError for what xgrammar cannot enforce."""
        import xgrammar as xgr

        try:
            if self.kind == "json_schema":
                # No free whitespace: a weak or random model would otherwise emit spaces until the token budget ends.
                return xgr.Grammar.from_json_schema(self.source, any_whitespace=False)
            return xgr.Grammar.from_ebnf(self.source)
        except Exception as err:
            raise GrammarError(f"the constrained decoder cannot enforce this {self.kind}: {err}") from None


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer, each once."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        self._compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
        self._compiled: dict[Grammar, object] = {}

    def processor_factory(self, grammars: Grammar | list[Grammar]):
        """A callable making a fresh logits processor: one grammar for every row of a batch, or one per row.
        Fresh because xgrammar's processors hold per-generation state."""
        import xgrammar as xgr

        for grammar in grammars if isinstance(grammars, list) else [grammars]:
            if grammar not in self._compiled:
                self._compiled[grammar] = self._compiler.compile_grammar(grammar.parsed())
        if isinstance(grammars, list):
            compiled = [self._compiled[g] for g in grammars]
            return lambda: xgr.contrib.hf.LogitsProcessor(list(compiled))
        single = self._compiled[grammars]
        return lambda: xgr.contrib.hf.LogitsProcessor(single)
