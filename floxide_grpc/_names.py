"""One rule for names, one for keys: what clients may call things, checked alike everywhere.

- **Names** (namespaces, workflows, nodes, route labels): 1 to 128 ASCII letters, digits, ``_``,
  ``.`` and ``-``. No ``:``, which separates the fields of a claim token, and nothing a key path
  or a shell would read otherwise.
- **Keys** (idempotency keys, request ids): 1 to 256 bytes of UTF-8 without control characters
  (a ``/``, a space or an ``ñ`` is fine, a newline is not). They are hashed where they become
  part of an etcd key.

A name or key that breaks its rule is INVALID_ARGUMENT, naming the field and the rule.
"""

from __future__ import annotations

import re
import unicodedata

from floxide_grpc.errors import FloxideError, InvalidArgument

__all__ = ["KEY_RULE", "NAME_RULE", "check_key", "check_name", "is_name"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
NAME_RULE = "1 to 128 ASCII letters, digits, '_', '.' and '-'"
KEY_RULE = "1 to 256 bytes of UTF-8 without control characters"


def is_name(value: str) -> bool:
    """Whether ``value`` keeps the rule for names."""
    return bool(_NAME.fullmatch(value))  # "$" would let a final newline in


def check_name(what: str, value: str, error: type[FloxideError] = InvalidArgument) -> str:
    """``value`` if it keeps the rule for names.

    Raises:
        InvalidArgument: (or ``error``) naming ``what`` and the rule.
    """
    if not is_name(value):
        raise error(f"{what} {value[:200]!r}: a name is {NAME_RULE}")
    return value


def check_key(what: str, value: str) -> str:
    """``value`` if it keeps the rule for keys (idempotency keys, request ids).

    Raises:
        InvalidArgument: naming ``what`` and the rule.
    """
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if not 1 <= size <= 256 or any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise InvalidArgument(f"{what} {value[:200]!r}: a key is {KEY_RULE}")
    return value
