"""Policies by name. Adding one touches one file: a class with ``@register`` in this package
(imported below), or a user's class named in a config as ``my_package.module:MyPolicy``."""

from hetero_sched.policies.base import Decision, GroupView, Placement, Policy, Reject, RequestInfo
from hetero_sched.policies.registry import POLICIES, make_policy, policy_class, register
from hetero_sched.policies import colocated, disagg  # noqa: F401  (built-ins register themselves)

__all__ = ["Decision", "GroupView", "Placement", "Policy", "Reject", "RequestInfo", "POLICIES",
           "make_policy", "policy_class", "register"]
