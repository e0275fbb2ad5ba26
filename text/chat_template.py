"""Chat templates: render a list of messages into a prompt string the way transformers does.

Templates come from model folders downloaded from the internet, so they are untrusted code: they
run in jinja2's ImmutableSandboxedEnvironment with the same globals and filters transformers
provides (raise_exception, strftime_now, tojson without HTML escaping, loop controls, a
`{% generation %}` block), so a template renders here byte for byte as it does in transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for serving it only has to render its body, but without it such templates
    would not even compile."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace(), refusing underscore names as transformers does, so a template
    cannot plant dunder attributes to reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same signature trick as jinja2's Namespace so that `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed names on a namespace: {name!r}"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; prompts must see the raw characters.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _dict
    env.globals["namespace"] = _TemplateNamespace
    return env


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the shape of a chat and return it with None-valued keys dropped.

    transformers drops keys whose value is None (APIs send `content: null` next to tool calls)
    because templates handle a missing key but would print a literal "None".
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ValueError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty; send at least one message")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise ValueError(f"messages[{i}] has no {' or '.join(repr(k) for k in missing)} key")
        if not isinstance(message["role"], str):
            raise ValueError(
                f"messages[{i}]['role'] must be a string, got {type(message['role']).__name__}"
            )
        cleaned.append({k: v for k, v in message.items() if v is not None})
    return cleaned


class ChatTemplate:
    """One model's chat template, compiled on first use and reused for every request.

    Compiling lazily keeps a model with a template this code cannot compile usable for plain
    prompts; the error surfaces on the first chat request instead of at load time.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._compiled: jinja2.Template | None = None

    def _template(self) -> jinja2.Template:
        if self._compiled is None:
            try:
                self._compiled = _environment().from_string(self.source)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(
                    f"the model's chat template does not compile (line {e.lineno}: {e.message}); "
                    "fix the template in the model folder or send plain prompts"
                ) from e
        return self._compiled

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        variables: Mapping[str, Any],
    ) -> str:
        """Render validated messages; `variables` (special tokens, user kwargs) are visible to
        the template. A template that rejects the chat (raise_exception) gives ValueError."""
        context = {"tools": None, "documents": None, **variables}
        context["messages"] = messages
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return self._template().render(**context)
        except jinja2.TemplateError as e:
            # Templates use raise_exception for bad input (roles that do not alternate, a system
            # message where none is allowed): that is the caller's to fix, hence ValueError.
            raise ValueError(f"the model's chat template rejected the messages: {e}") from e
