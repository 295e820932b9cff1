"""In-pod mode: the node agent channel (:mod:`ztunnel.inpod.channel`) and per-pod listeners."""
