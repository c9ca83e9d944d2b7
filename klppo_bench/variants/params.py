"""A variant's settable parameter: its default, type, range, and the parsing that checks them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from klppo_bench.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One settable parameter of a variant.

    Attributes:
        default: value used when a run does not set it.
        kind: ``bool``, ``int``, ``float`` or ``str``.
        doc: one line for ``klppo-bench variants --params``.
        choices: allowed values (``str`` parameters).
        low / high: bounds; ``low_open`` / ``high_open`` make them strict.
        loss_kwarg: keyword passed to the loss class (``None``: used by the harness only).
    """

    default: Any
    kind: type
    doc: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    loss_kwarg: str | None = "same"

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high}")
        return " ".join([self.kind.__name__, " and ".join(bounds)]).strip()

    def parse(self, raw: Any, key: str, where: str) -> Any:
        """Convert ``raw`` (a YAML value or a command-line string) and check its range."""

        def bad(reason: str = "") -> ConfigError:
            return ConfigError(
                f"{where}: {key}={raw!r} is invalid{reason}; allowed: {self.allowed()}"
            )

        value = raw
        if self.kind is bool:
            if isinstance(raw, bool):
                value = raw
            elif isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
                value = raw.lower() in _TRUE
            else:
                raise bad()
        elif self.kind is int:
            if isinstance(raw, bool):
                raise bad()
            try:
                value = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
            except (TypeError, ValueError):
                value = None
            if value is None:
                raise bad()
        elif self.kind is float:
            if isinstance(raw, bool):
                raise bad()
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise bad() from None
            if not math.isfinite(value):
                raise bad(" (not finite)")
        elif self.kind is str:
            value = str(raw)
        if self.choices is not None and value not in self.choices:
            raise bad()
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad(" (out of range)")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad(" (out of range)")
        return value
