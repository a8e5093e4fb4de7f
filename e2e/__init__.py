"""End-to-end tooling: the local control plane, the node agent and the e2e suite."""
