"""The Kubernetes objects a platform team applies once: webhook server, its configs, and policy.

``failurePolicy`` is the one real trade-off and is a parameter, not a constant:

* ``Fail`` (default): when the webhook is unreachable, pod creation in opted-in
  namespaces fails. No pod ever starts unprotected, but an injector outage
  blocks deployments there (which is why it runs 2 replicas behind a PDB and
  never selects its own namespace or kube-system).
* ``Ignore``: pods are created without the sidecar while the webhook is down;
  deployments go on, unprotected. The ``/validate`` webhook (always ``Fail``)
  still refuses CDE pods that end up without the sidecar, so ``Ignore`` on the
  injector cannot open a hole in the cardholder-data environment.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import yaml

from injector import ANN_INJECT, LABEL_INJECTION, LABEL_SCOPE, __version__, psa
from injector.config import FAILURE_POLICIES, InjectorConfig
from injector.guard import GRANT_LABELS, GRANTS, grants_path

APP = "palisade-injector"
TLS_SECRET = "palisade-injector-tls"
CONFIG_MAP = "palisade-injector-config"
MUTATING_NAME = "inject.palisade.dev"
VALIDATING_NAME = "cde.palisade.dev"
WEBHOOK_PORT = 8443
CERT_DIR = "/etc/palisade-injector/tls"
CONFIG_DIR = "/etc/palisade-injector/config"

# The reference policy's cluster-wide baseline (DESIGN.md): safe to ship as a default.
BASELINE_POLICY = """\
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata:
  name: baseline
spec:
  rules:
    - name: no-ssh-into-containers
      direction: ingress
      appProto: ssh
      action: deny
"""


@dataclass(frozen=True, slots=True)
class ManifestOptions:
    namespace: str = "palisade-system"
    ca_bundle: bytes | None = None           # PEM of the CA that signed the serving cert
    tls_cert: bytes | None = None            # when given, a kubernetes.io/tls Secret is emitted
    tls_key: bytes | None = None
    failure_policy: str = "Fail"
    timeout_seconds: int = 10
    replicas: int = 2
    policy_namespaces: tuple[str, ...] = ("default",)
    config: InjectorConfig = InjectorConfig()

    def check(self) -> None:
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failurePolicy must be one of {', '.join(FAILURE_POLICIES)}, "
                             f"got {self.failure_policy!r}")
        if not 1 <= self.timeout_seconds <= 30:
            raise ValueError(f"timeoutSeconds must be between 1 and 30 (API server limit), "
                             f"got {self.timeout_seconds}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.ca_bundle is not None and b"-----BEGIN CERTIFICATE-----" not in self.ca_bundle:
            raise ValueError("CA bundle is not a PEM certificate")


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/part-of": "palisade",
            "app.kubernetes.io/version": __version__}


def _meta(name: str, namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = _labels()
    return meta


def _client_config(opts: ManifestOptions, path: str) -> dict[str, Any]:
    cc: dict[str, Any] = {"service": {"name": APP, "namespace": opts.namespace, "path": path, "port": 443}}
    if opts.ca_bundle:
        cc["caBundle"] = base64.b64encode(opts.ca_bundle).decode()
    return cc


def _system_namespaces(opts: ManifestOptions) -> list[str]:
    return sorted({"kube-system", opts.namespace, *opts.config.ignored_namespaces})


def deployment(opts: ManifestOptions) -> dict[str, Any]:
    selector = {"app.kubernetes.io/name": APP}
    probe = {"httpGet": {"path": "/readyz", "port": WEBHOOK_PORT, "scheme": "HTTPS"},
             "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(APP, opts.namespace),
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                # The injector never injects itself, even if someone labels its namespace.
                "metadata": {"labels": {**_labels(), ANN_INJECT: "false"}},
                "spec": {
                    "serviceAccountName": APP,
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": selector},
                    }],
                    "containers": [{
                        "name": "injector",
                        "image": opts.config.image,
                        "imagePullPolicy": opts.config.image_pull_policy,
                        "command": ["python", "-m", "injector", "serve"],
                        "args": ["--cert", f"{CERT_DIR}/tls.crt", "--key", f"{CERT_DIR}/tls.key",
                                 "--port", str(WEBHOOK_PORT), "--config", f"{CONFIG_DIR}/config.yaml",
                                 "--reload-interval", "5"],
                        "ports": [{"name": "https", "containerPort": WEBHOOK_PORT, "protocol": "TCP"}],
                        "readinessProbe": probe,
                        "livenessProbe": {**probe, "httpGet": {**probe["httpGet"], "path": "/healthz"},
                                          "periodSeconds": 10},
                        "resources": {"requests": {"cpu": "100m", "memory": "96Mi"},
                                      "limits": {"memory": "256Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "tls", "mountPath": CERT_DIR, "readOnly": True},
                            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                        ],
                    }],
                    "volumes": [
                        {"name": "tls", "secret": {"secretName": TLS_SECRET}},
                        {"name": "config", "configMap": {"name": CONFIG_MAP}},
                    ],
                },
            },
        },
    }


def _inject_webhook(opts: ManifestOptions, name: str, path: str, psa_expr: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "clientConfig": _client_config(opts, path),
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"], "scope": "Namespaced"}],
        "namespaceSelector": {"matchExpressions": [
            {"key": LABEL_INJECTION, "operator": "In", "values": ["enabled"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": _system_namespaces(opts)},
            psa_expr,
        ]},
        "objectSelector": {"matchExpressions": [
            {"key": ANN_INJECT, "operator": "NotIn", "values": ["false"]},
        ]},
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": opts.timeout_seconds,
        "failurePolicy": opts.failure_policy,
        "matchPolicy": "Equivalent",
        "reinvocationPolicy": "IfNeeded",
    }


def mutating_webhook(opts: ManifestOptions) -> dict[str, Any]:
    """The injector, plus one webhook per Pod Security level that would reject the injected pod:
    in those namespaces the pod is refused with the fix instead of injected (psa.py). The
    ``enforce`` label's value selects exactly one of them; no label means the cluster's default
    level (``privileged`` unless the API server's AdmissionConfiguration says otherwise)."""
    hooks = [_inject_webhook(opts, MUTATING_NAME, "/mutate",
                             {"key": psa.ENFORCE_LABEL, "operator": "NotIn", "values": list(psa.REJECTING_LEVELS)})]
    hooks += [_inject_webhook(opts, psa.webhook_name(level), psa.WEBHOOK_PATH.format(level=level),
                              {"key": psa.ENFORCE_LABEL, "operator": "In", "values": [level]})
              for level in psa.REJECTING_LEVELS]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": _meta(APP),
        "webhooks": hooks,
    }


GUARD_NAME = "guard.palisade.dev"


def _cde_webhook(opts: ManifestOptions, grants: tuple[str, ...]) -> dict[str, Any]:
    """One CDE webhook for one combination of the namespace's admin grant labels.

    AdmissionReview does not carry namespace labels; the API server evaluates the
    ``namespaceSelector`` and calls exactly one of these webhooks, whose path names the grants
    (guard.py). The selectors are mutually exclusive, so each CDE pod is judged once."""
    exprs = [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
              "values": sorted({"kube-system", opts.namespace})}]
    for grant in GRANTS:
        exprs.append({"key": GRANT_LABELS[grant], "operator": "In" if grant in grants else "NotIn",
                      "values": ["true"]})
    suffix = "-".join(grants)
    return {
        "name": f"cde-{suffix}.palisade.dev" if grants else VALIDATING_NAME,
        "clientConfig": _client_config(opts, grants_path(grants)),
        # pods/ephemeralcontainers: `kubectl debug` adds containers to a running pod through it.
        "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods", "pods/ephemeralcontainers"], "scope": "Namespaced"}],
        # Every namespace, opted in or not: a CDE pod in a namespace nobody labelled is
        # exactly the one that must be refused.
        "namespaceSelector": {"matchExpressions": exprs},
        # On UPDATE the API server matches old or new object: a label change into (or out of)
        # the CDE is seen here.
        "objectSelector": {"matchExpressions": [
            {"key": LABEL_SCOPE, "operator": "In", "values": ["cde"]},
        ]},
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": opts.timeout_seconds,
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
    }


def _guard_webhook(opts: ManifestOptions) -> dict[str, Any]:
    """Pods outside the CDE in opted-in namespaces: dangerous fields warned (or refused by config),
    the sidecar's capture volume never mounted by another container (also by ephemeral ones)."""
    return {
        "name": GUARD_NAME,
        "clientConfig": _client_config(opts, "/validate"),
        "rules": [
            {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
             "resources": ["pods"], "scope": "Namespaced"},
            {"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
             "resources": ["pods/ephemeralcontainers"], "scope": "Namespaced"},
        ],
        "namespaceSelector": {"matchExpressions": [
            {"key": LABEL_INJECTION, "operator": "In", "values": ["enabled"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": _system_namespaces(opts)},
        ]},
        "objectSelector": {"matchExpressions": [
            {"key": LABEL_SCOPE, "operator": "NotIn", "values": ["cde"]},
        ]},
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": opts.timeout_seconds,
        # Same trade-off as the injector itself (the capture volume exists only where it injects).
        "failurePolicy": opts.failure_policy,
        "matchPolicy": "Equivalent",
    }


EXEC_NAME = "exec.palisade.dev"


def _exec_webhook(opts: ManifestOptions) -> dict[str, Any]:
    """``kubectl exec``/``attach`` into Palisade's containers, in every opted-in namespace.

    No ``objectSelector``: the API server matches it against the request's object, a
    PodExecOptions without metadata, which never matches a non-empty selector (the webhook
    would silently never be called)."""
    hook = _guard_webhook(opts)
    hook.pop("objectSelector")
    hook["name"] = EXEC_NAME
    hook["rules"] = [{"operations": ["CONNECT"], "apiGroups": [""], "apiVersions": ["v1"],
                      "resources": ["pods/exec", "pods/attach"], "scope": "Namespaced"}]
    return hook


def validating_webhook(opts: ManifestOptions) -> dict[str, Any]:
    """The admission guard: four CDE webhooks (one per grant combination, failurePolicy Fail) and
    the guard for the rest of the opted-in namespaces.

    No ``matchConditions``: the selectors and rules above express the scope exactly, and a CEL
    pre-filter would restate the guard's rules in a second language where a mistake fails open."""
    combos: list[tuple[str, ...]] = [()]
    for grant in GRANTS:
        combos += [(*c, grant) for c in combos]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": _meta("palisade-cde-guard"),
        "webhooks": [*(_cde_webhook(opts, c) for c in combos), _guard_webhook(opts), _exec_webhook(opts)],
    }


def build(opts: ManifestOptions) -> list[dict[str, Any]]:
    """All objects, in an order ``kubectl apply -f`` can create them in."""
    opts.check()
    ns = opts.namespace
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns)},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(APP, ns),
         "automountServiceAccountToken": False},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(CONFIG_MAP, ns),
         "data": {"config.yaml": yaml.safe_dump(opts.config.to_dict(), sort_keys=False)}},
    ]
    if opts.tls_cert and opts.tls_key:
        objs.append({"apiVersion": "v1", "kind": "Secret", "metadata": _meta(TLS_SECRET, ns),
                     "type": "kubernetes.io/tls",
                     # ca.crt as the Helm chart stores it (the chart reuses it on upgrade)
                     "data": {**({"ca.crt": base64.b64encode(opts.ca_bundle).decode()} if opts.ca_bundle else {}),
                              "tls.crt": base64.b64encode(opts.tls_cert).decode(),
                              "tls.key": base64.b64encode(opts.tls_key).decode()}})
    objs += [
        deployment(opts),
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(APP, ns),
         "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": APP}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(APP, ns),
         "spec": {"selector": {"app.kubernetes.io/name": APP},
                  "ports": [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]}},
    ]
    for policy_ns in opts.policy_namespaces:
        objs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": _meta(opts.config.policy_config_map, policy_ns),
                     "data": {"baseline.yaml": BASELINE_POLICY}})
    objs += sidecar_rbac(opts)
    objs += [mutating_webhook(opts), validating_webhook(opts)]
    return objs


SIDECAR_ROLE = "palisade-sidecar-pod-reader"


def sidecar_rbac(opts: ManifestOptions) -> list[dict[str, Any]]:
    """Read access to pods for sidecars with ``kubernetes_identity`` (peer names and labels).

    The sidecar runs under the application pod's service account, so the binding names the
    service-account groups of the opted-in namespaces (``policy_namespaces``), not one account:
    read-only, pods only, and nothing for namespaces that did not opt in."""
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": _meta(SIDECAR_ROLE),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": _meta(SIDECAR_ROLE),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SIDECAR_ROLE},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                             "name": f"system:serviceaccounts:{ns}"} for ns in opts.policy_namespaces]}
    return [role, binding]


class _Dumper(yaml.SafeDumper):
    """Readable manifests: no &anchors for shared dicts, multi-line strings as ``|`` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objs: list[dict[str, Any]]) -> str:
    header = ("# Generated by `python -m injector manifests` (palisade-injector "
              f"{__version__}); edit the generator, not this file.\n")
    return header + yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=120)
