//! `drbdd`: the daemon that hosts this node's resources and serves `drbdadm`'s requests on
//! `STATE_DIR/drbdd.sock` (see `drbd_cli::daemon`), each resource as an NBD export at
//! `STATE_DIR/RES.nbd`. Runs in the foreground until SIGTERM or SIGINT.

use std::sync::Arc;

use drbd_cli::daemon::main_with_factory;
use drbd_cli::runtime::RuntimeFactory;

fn main() {
    std::process::exit(main_with_factory(Arc::new(RuntimeFactory)));
}
