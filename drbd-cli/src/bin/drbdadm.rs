//! `drbdadm`: administration of replicated resources, compatible with drbd-utils' drbdadm.

fn main() {
    std::process::exit(drbd_cli::adm::main_with_env());
}
