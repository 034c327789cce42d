"""One template for every error lora_jax raises: what, where, and how to fix it.

Every message reads ``<where>: <what>. Fix: <fix>.`` -- ``where`` is the
parameter path (``params/block_0/q/kernel``), the file or directory, or the
call (``lj.restore``, ``LoraConfig.rank``) the problem belongs to; ``what``
says what is wrong (showing both sides of a mismatch); ``fix`` is the change
that makes it right, as code where that is clearer. `error` builds the
exception; the library raises it (``raise error(...)``) so tracebacks point
at the check itself.
"""

from __future__ import annotations

__all__ = ["error", "message"]


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."


def message(where: str, what: str, fix: str | None = None) -> str:
    """The template's text: ``"<where>: <what>. Fix: <fix>."``.

    Example:
      >>> print(message("params/q/kernel", "rank 9 exceeds min(in, out) = 8",
      ...               "rank_pattern={r'params/q/kernel': 8}"))
      params/q/kernel: rank 9 exceeds min(in, out) = 8. Fix: rank_pattern={r'params/q/kernel': 8}.
    """
    text = f"{where}: {_sentence(what)}"
    if fix:
        text += f" Fix: {_sentence(fix)}"
    return text


def error(where: str, what: str, fix: str | None = None, *, kind: type = ValueError
          ) -> Exception:
    """An exception of type ``kind`` whose message follows the template.

    Example:
      >>> e = error("lj.init", "init='kaiming' draws A at random and needs a PRNG key",
      ...           "lj.init(params, config, key=jax.random.key(0))")
      >>> type(e).__name__
      'ValueError'
      >>> print(e)  # doctest: +NORMALIZE_WHITESPACE
      lj.init: init='kaiming' draws A at random and needs a PRNG key.
      Fix: lj.init(params, config, key=jax.random.key(0)).
    """
    return kind(message(where, what, fix))
