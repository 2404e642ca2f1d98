"""Policies by name. Adding one touches one file: a class with ``@register`` in this package
(imported below), or a user's class named in a config as ``my_package.module:MyPolicy``."""

from hetero_sched.core.fleet import Fleet, Ranking
from hetero_sched.policies.base import (Decision, GroupView, Placement, Policy, PolicyFailed, Reject, RejectCode,
                                        RequestInfo, RoleSwitch)
from hetero_sched.policies.registry import POLICIES, make_policy, policy_class, register
from hetero_sched.policies import (adaptive, colocated, colocated_chunked, disagg,  # noqa: F401
                                   disagg_prefix, disagg_slo)                       # (built-ins register themselves)

__all__ = ["Decision", "Fleet", "GroupView", "Placement", "Policy", "PolicyFailed", "Ranking", "Reject", "RejectCode",
           "RequestInfo", "RoleSwitch", "POLICIES",
           "make_policy", "policy_class", "register"]
