"""The sidecar process: `python -m firewall run` (the Sidecar app), its configuration and privilege drop."""
