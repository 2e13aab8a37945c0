"""The flag vocabulary shared by the ``ghostnoise`` subcommands (``compare``, ``analyze``).

One convention for every list flag: space-separated values (``--ghost-batch-size 8 16``,
``--methods gni gbn``), one name per concept (``--ghost-batch-size``, ``--methods``, ``--seed``,
``--data-dir``, ``--out-dir``, ``--no-plot``). Earlier spellings keep working and say on stderr
what to write instead: comma lists (``--ghost-batch-size 8,16``) and renamed flags
(``analyze --ghost-batch-sizes``, ``analyze --no-plots``).

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("--ghost-batch-size", action=ListFlag, item=positive_int("--ghost-batch-size"))
    >>> p.parse_args(["--ghost-batch-size", "8", "16"]).ghost_batch_size
    [8, 16]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, List, Optional, Sequence, Union

__all__ = ["DeprecatedSwitch", "ListFlag", "deprecation", "positive_int"]


def deprecation(message: str) -> None:
    """Print ``ghostnoise: deprecated: <message>`` on stderr (the run goes on)."""
    print(f"ghostnoise: deprecated: {message}", file=sys.stderr, flush=True)


def positive_int(flag: str, low: int = 1) -> Callable[[str], int]:
    """An argparse ``type`` for the subcommands' integer flags: an integer ``>= low``, or a message naming ``flag``.

    Example:
        >>> positive_int("--epochs")("3")
        3
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {low}, got {value}")
        return value

    return parse


class ListFlag(argparse.Action):
    """A list flag: one or more space-separated values (``nargs="+"``), each converted by ``item``.

    A value holding commas (the earlier spelling ``8,16``) is split, with a deprecation message. A
    flag added with ``replaced_by="--new-name"`` is an earlier name of the same flag: it works, and
    says which name to use (give it ``help=argparse.SUPPRESS`` and the new flag's ``dest``).

    Args:
        item: converts one value; raise ``argparse.ArgumentTypeError`` or ``ValueError`` with a
            message for a bad one.
        replaced_by: the flag's current name, for a deprecated alias.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--methods", action=ListFlag, item=str.lower)
        >>> p.parse_args(["--methods", "GNI", "gbn"]).methods
        ['gni', 'gbn']
    """

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        item: Callable[[str], Any] = str,
        replaced_by: Optional[str] = None,
        nargs: Union[int, str, None] = "+",
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)
        self.item = item
        self.replaced_by = replaced_by

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Union[str, Sequence[Any], None],
        option_string: Optional[str] = None,
    ) -> None:
        flag = self.replaced_by or option_string or self.dest
        texts: List[str] = [values] if isinstance(values, str) else [str(v) for v in values or ()]
        if self.replaced_by is not None:
            deprecation(
                f"{option_string} is now {self.replaced_by}; write {self.replaced_by} {' '.join(self._split(texts))}."
            )
        elif any("," in text for text in texts):
            deprecation(
                f"comma-separated values for {flag}; separate them with spaces: {flag} {' '.join(self._split(texts))}."
            )
        out: List[Any] = []
        for text in self._split(texts):
            try:
                out.append(self.item(text))
            except (argparse.ArgumentTypeError, ValueError) as err:
                parser.error(f"argument {flag}: {err}")
        if not out:
            parser.error(f"argument {flag}: expected at least one value")
        setattr(namespace, self.dest, out)

    @staticmethod
    def _split(texts: Sequence[str]) -> List[str]:
        return [part.strip() for text in texts for part in text.split(",") if part.strip()]


class DeprecatedSwitch(argparse.Action):
    """An earlier name of an on/off flag (``store_true``): sets ``dest`` and says which name to use.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--no-plot", action="store_true")
        >>> _ = p.add_argument("--no-plots", dest="no_plot", action=DeprecatedSwitch, replaced_by="--no-plot")
        >>> p.parse_args(["--no-plots"]).no_plot  # also prints a deprecation message on stderr
        True
    """

    def __init__(self, option_strings: Sequence[str], dest: str, replaced_by: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.replaced_by = replaced_by

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Union[str, Sequence[Any], None],
        option_string: Optional[str] = None,
    ) -> None:
        deprecation(f"{option_string} is now {self.replaced_by}.")
        setattr(namespace, self.dest, True)
