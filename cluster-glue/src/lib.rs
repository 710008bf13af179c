//! `cluster-glue` will hold the cluster integration around the replicated device: fencing
//! (STONITH over ssh, the bridge to standard fence-agents, DRBD's fence-peer contract), the OCF
//! resource agents, OCFS2 `cluster.conf` generation and mount control, and the Pacemaker
//! configuration of the whole stack.
