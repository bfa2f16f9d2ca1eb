"""A farm of hosts in Linux namespaces and the faults injected into it (issue 27)."""
