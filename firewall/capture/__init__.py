"""Bounded packet captures (pcap) of the pod's traffic and the `capture` CLI."""
