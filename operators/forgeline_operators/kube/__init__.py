"""Kubernetes plumbing shared by Forgeline's cluster operators: CRD generation from the pydantic models
(:mod:`.crd`), offline validation of every manifest against its real schema (:mod:`.validate`), the
API client helpers and the operator process (owned by the controllers' authors). Importing this package
imports neither kopf nor the Kubernetes client.
"""
