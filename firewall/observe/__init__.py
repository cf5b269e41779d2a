"""What leaves the sidecar as text: EVE events, metrics, alert delivery, redaction and signature ids."""
