"""Palisade: an inline network firewall and DLP sidecar for Kubernetes pods.

Data flows one way through the sidecar::

    accept -> identify peer -> L4 verdict -> connect upstream
           -> per-direction inspection (protocol parser -> L7 verdict -> DLP scan)
           -> forward or block -> flow record -> events / metrics

``datapath/proxy.py`` owns the sockets and nothing else; ``datapath/session.py`` is the
sans-IO inspection pipeline for one flow; ``policy/``, ``dlp/`` and ``protocols/`` are pure
data + functions that the session calls.  One package per concern (docs/architecture.md).
"""

__version__ = "0.1.0"

# Kubernetes contract (DESIGN.md): stable names used by the injector, the sidecar and the docs.
ANN_INJECT = "palisade.dev/inject"
ANN_STATUS = "palisade.dev/status"
ANN_MODE = "palisade.dev/mode"
ANN_PCAP = "palisade.dev/pcap"
ANN_QUARANTINE = "palisade.dev/quarantine"
ANN_EXCLUDE_INBOUND_PORTS = "palisade.dev/exclude-inbound-ports"
ANN_EXCLUDE_OUTBOUND_PORTS = "palisade.dev/exclude-outbound-ports"
ANN_EXCLUDE_OUTBOUND_CIDRS = "palisade.dev/exclude-outbound-cidrs"
LABEL_INJECTION = "palisade.dev/injection"
LABEL_SCOPE = "pci.palisade.dev/scope"
SCOPES = ("cde", "connected", "out-of-scope")

PROXY_UID = 1337
PROXY_GID = 1337
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
ADMIN_PORT = 15020
