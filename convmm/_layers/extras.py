"""Optional dependencies: the error that says which convmm extra installs one."""

from __future__ import annotations


def missing_extra(module: str, extra: str, error: ModuleNotFoundError) -> ModuleNotFoundError:
  """The error for ``module``, which could not import a dependency of convmm's ``extra``.

  Args:
    module: the convmm module being imported (``"convmm.linen"``).
    extra: the extra in pyproject.toml that installs the dependency (``"flax"``).
    error: the import's error, quoted in the message.

  Returns:
    A ``ModuleNotFoundError`` naming the module, the missing dependency and the
    command that installs the extra (raise it ``from error``).

  Example:
    >>> error = ModuleNotFoundError("No module named 'flax'", name="flax")
    >>> print(missing_extra("convmm.linen", "flax", error))
    convmm.linen: needs the `flax` extra (No module named 'flax'); install it with
    `pip install -e '.[flax]'` in a clone of convmm
  """
  return ModuleNotFoundError(
    f"{module}: needs the `{extra}` extra ({error}); install it with "
    f"`pip install -e '.[{extra}]'` in a clone of convmm",
    name=error.name,
  )
