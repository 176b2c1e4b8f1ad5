"""The Kubernetes face of the operators: ``forgeline render`` (:mod:`.render`), the generated CRD files
(:mod:`.crds`), offline validation of every rendered manifest (:mod:`.validate`), ``run --on kubernetes``
(:mod:`.kuberay`, :mod:`.submit`) and the operator process that runs both controllers (:mod:`.operator`).
It sits above the stage folders (it renders their objects); the plumbing the stages share -- the API
client, CRD generation, conditions, built-in schema checks -- is in :mod:`forgeline_operators.lib`
(``kube_*``), so no stage imports this package. Importing it imports neither kopf nor the Kubernetes
client.
"""
