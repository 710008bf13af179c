//! `drbdd`: the daemon that hosts this node's resources and serves `drbdadm`'s requests on
//! `STATE_DIR/drbdd.sock` (see `drbd_cli::daemon`), each resource as an NBD export at
//! `STATE_DIR/RES.nbd` (and on TCP with `--nbd-tcp ADDR:PORT`). Runs in the foreground until SIGTERM or SIGINT.

use std::sync::Arc;

use drbd_cli::daemon::main_with;
use drbd_cli::runtime::RuntimeFactory;

fn main() {
    drbd_cli::alloc::tune();
    std::process::exit(main_with(|opts| {
        Arc::new(RuntimeFactory::new(opts.nbd_tcp))
    }));
}
