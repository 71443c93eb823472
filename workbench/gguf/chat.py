"""Chat templates: a GGUF file's Jinja template turning messages into prompt text.

The template comes from the model file, so it is untrusted code. It runs in Jinja's immutable
sandbox, configured as HuggingFace's ``apply_chat_template`` configures it (trim_blocks,
lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps
non-ASCII text). Where the stock sandbox would quietly render an unsafe attribute as an empty
string, this one refuses the template.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from workbench.errors import ModelError, UserError

# What llama.cpp falls back to when a model has no template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Largest string or list a template may build with * or **: far above any real prompt, far
# below what would exhaust memory.
MAX_BUILT = 1 << 22


class _Rejected(Exception):
    """The template called raise_exception(): it refuses these messages."""


def _raise_exception(message: str) -> NoReturn:
    raise _Rejected(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts need the text as it is.
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: HF marks the assistant's text with it (to mask
    training losses); for rendering it is just its body."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, made to fail loudly on unsafe access and huge results."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**" and isinstance(right, int) and abs(right) > 64:
            raise SecurityError(f"exponent {right} is too large")
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                sized = isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                if sized and len(seq) * n > MAX_BUILT:
                    raise SecurityError(f"repeating a sequence {n} times is too large")
        return {"*": operator.mul, "**": operator.pow}[op](left, right)


def _environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _private(name: object) -> bool:
    """Dunder and name-mangled names (``__class__``, ``_Foo__bar``): never data, always internals.

    A single leading underscore (``d._k``) may be an ordinary dict key; the sandbox decides those
    at run time.
    """
    return isinstance(name, str) and name.startswith("_") and "__" in name


def _unsafe_names(ast: jinja2.nodes.Template) -> list[str]:
    """Private names a template reaches for (``x.__class__``, ``x['__y']``, ``attr('__z')``).

    The sandbox refuses these when they run; finding them first means a hostile template is
    refused before any of it executes.
    """
    found = [n.attr for n in ast.find_all(jinja2.nodes.Getattr) if _private(n.attr)]
    for item in ast.find_all(jinja2.nodes.Getitem):
        if isinstance(item.arg, jinja2.nodes.Const) and _private(item.arg.value):
            found.append(item.arg.value)
    for f in ast.find_all(jinja2.nodes.Filter):
        name = f.args[0] if f.name == "attr" and f.args else None
        if isinstance(name, jinja2.nodes.Const) and _private(name.value):
            found.append(name.value)
    return found


class ChatTemplate:
    """A compiled chat template; `render` formats a conversation as the model expects."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        """Compile ``source``; raises `ModelError` if it is malformed or reaches for internals."""
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = _environment()
        try:
            ast = env.parse(source)
        except TemplateSyntaxError as e:
            raise ModelError(
                "model.bad_chat_template",
                f"the chat template does not parse: {e.message} (line {e.lineno})",
                line=e.lineno,
            ) from e
        unsafe = _unsafe_names(ast)
        if unsafe:
            raise ModelError(
                "model.unsafe_chat_template",
                f"the chat template reaches for Python internals ({', '.join(sorted(set(unsafe)))})"
                "; refusing to run it",
                names=sorted(set(unsafe)),
            )
        try:
            self._template = env.from_string(ast)
        except TemplateError as e:
            raise ModelError(
                "model.bad_chat_template", f"the chat template does not compile: {e}"
            ) from e

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> ChatTemplate:
        """The model's ``tokenizer.chat_template``, or ChatML when it has none (as llama.cpp)."""
        source = md.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source.strip():
            source = CHATML
        tokens = md.get("tokenizer.ggml.tokens") or []

        def text(key: str) -> str:
            i = md.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

        return cls(
            source,
            bos_token=text("tokenizer.ggml.bos_token_id"),
            eos_token=text("tokenizer.ggml.eos_token_id"),
        )

    def render(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for ``messages`` (each with string "role" and "content")."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise UserError("user.bad_messages", "messages must be a list of role/content maps")
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise UserError(
                    "user.bad_messages", f"message {i} is a {type(m).__name__}, not a mapping"
                )
            for key in ("role", "content"):
                if not isinstance(m.get(key), str):
                    raise UserError(
                        "user.bad_messages", f"message {i} needs a string {key!r}", index=i
                    )
            plain.append(dict(m))
        try:
            return self._template.render(
                messages=plain,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except _Rejected as e:
            raise UserError("user.chat_rejected", str(e)) from e
        except SecurityError as e:
            raise ModelError(
                "model.unsafe_chat_template", f"the chat template was stopped: {e}"
            ) from e
        except Exception as e:  # anything else a template does wrong is the model file's fault
            raise ModelError(
                "model.bad_chat_template", f"the chat template failed: {type(e).__name__}: {e}"
            ) from e
