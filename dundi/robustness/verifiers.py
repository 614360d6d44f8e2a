"""The verifiers ``dundi certify`` can prove answers with, importable without torch (the CLI's
parser reads them): ``interval`` (interval bounds through the body, the last layer folded in
exactly: :mod:`dundi.robustness.certificate`) and ``linear`` (backward linear bounds through the
whole body on top of those intervals, the tighter of the two per condition:
:mod:`dundi.robustness.linear_bounds`)."""

VERIFIERS: tuple[str, ...] = ("interval", "linear")
DEFAULT_VERIFIER = "interval"

__all__ = ["VERIFIERS", "DEFAULT_VERIFIER"]
