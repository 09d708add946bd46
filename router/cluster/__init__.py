"""The cluster adapters: the API client and its one retry policy, informers, the lease, and the
control loops (routes, requestheader ConfigMap, NetworkPolicies)."""
