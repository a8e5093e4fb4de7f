"""A node agent that runs the pods scheduled to its Nodes as local processes on loopback IPs."""
