"""The zero-shot prompt: one template, one check, used by classify, jobs.evaluate and the app."""
from __future__ import annotations

import string

from koclip.errors import QueryError

DEFAULT_TEMPLATE = "이것은 {} 이다."  # "this is {}.", KoCLIP's zero-shot prompt


def check_template(template) -> str:
    """The template, if it has exactly one empty `{}` field where the label goes (literal braces
    are written `{{` and `}}`); else a QueryError saying so."""
    if not isinstance(template, str):
        raise QueryError(f"the prompt template must be a string, got {type(template).__name__}")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:  # an unmatched brace
        raise QueryError(f"the prompt template {template!r} is not a valid template ({e}); "
                         f"write literal braces as {{{{ and }}}}") from None
    if fields != [("", "", None)]:
        raise QueryError(f"the prompt template must contain {{}} exactly once, where the label goes "
                         f"(for example {DEFAULT_TEMPLATE!r}), got {template!r}")
    return template


def prompts(template: str, labels: list[str]) -> list[str]:
    """Each label put into the checked template."""
    check_template(template)
    return [template.format(label) for label in labels]
