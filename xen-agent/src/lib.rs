//! `xen-agent` will hold domU lifecycle management under the stack's constraints (start a domU
//! only where its resource is Primary and the cluster file system is mounted, run it on one dom0
//! at a time) and live migration (promote the target, migrate, demote the source), with an `xl`
//! backend and a QEMU backend.
