"""The network-namespace lab: `python -m firewall demo` and its container-runtime variant."""
