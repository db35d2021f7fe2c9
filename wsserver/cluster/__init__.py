"""What a node shares with other nodes: the backplane interface, the memory
and Redis backplanes, tunnels and adoption. Imports core and wire, never the
server: the server implements :class:`~wsserver.cluster.backplane.ClusterEvents`.
"""
