"""The two-step rule (Algorithm 1) and the oracle index it runs over.

``params`` declares the request (:class:`TwoStepRule`), the rule an index resolves it to
(:class:`ResolvedRule`) and their defaults, ``distance`` the distances it ranks by, ``index``
holds the oracle database, resolves requests and answers queries, ``exact`` is the fixed-order float64 arithmetic every
certifiable index answers through, ``search`` is FAISS under the index, ``reference`` the
brute-force and differentiable versions used by tests and attacks.
"""

from dundi.rule.params import (  # noqa: F401
                               COARSE_ORACLES,
                               DEFAULT_METRIC,
                               KEPT_CLASSES,
                               ORACLES_PER_CLASS,
                               ResolvedRule,
                               TwoStepResult,
                               TwoStepRule,
                               coarse_default,
)
