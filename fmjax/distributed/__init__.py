"""Spreading work over devices and processes: the one mesh axis (`mesh.DATA_AXIS`) and
the meshes over it, collectives (`collectives.psum_packed`), moving arrays onto devices
(`placement`), and multi-host start-up and batch arithmetic (`multihost`;
docs/multihost.md)."""
