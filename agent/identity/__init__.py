"""The agent's workload identity: what the data plane uses on every handshake.

Modules: spiffe (IDs), crypto and _libcrypto (keys, CSRs, certificates over libcrypto), files
(the identity directory), authority (who signs: the node itself in standalone mode),
credentials (one issued certificate), store (per-pod certificates and their renewal), tls (SSL
contexts, suite order, peer checks), remote (certificates from `pinion issuer`), setup (which
of the two, from the Config). The issuer service itself is agent/controlplane/issuer/.
Nothing is imported here, so importing one module costs only that.
"""
