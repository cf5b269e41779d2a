"""Who is at the other end of a flow: workload identities, FQDNs learned from DNS, the pod's podinfo."""
