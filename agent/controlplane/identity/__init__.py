"""Workload identity for the mesh: SPIFFE IDs, the CA and issuer, per-pod certificates and mTLS contexts.

Modules: spiffe (IDs), crypto (keys/CSRs/certificates over libcrypto), files (the identity
directory), authority (who signs), store (per-pod certificates and renewal), tls (SSL contexts,
suite order, peer checks). Nothing is imported here, so importing one module costs only that.
"""
