"""The two-step rule (Algorithm 1) and the oracle index it runs over.

``params`` declares the rule (:class:`TwoStepRule`) and its defaults, ``index`` holds the
oracle database and answers queries, ``exact`` is the fixed-order float64 arithmetic every
certifiable index answers through, ``search`` is FAISS under the index, ``reference`` the
brute-force and differentiable versions used by tests and attacks.
"""

from dundi.rule.params import (  # noqa: F401
                               COARSE_ORACLES,
                               KEPT_CLASSES,
                               ORACLES_PER_CLASS,
                               TwoStepResult,
                               TwoStepRule,
                               coarse_default,
)
