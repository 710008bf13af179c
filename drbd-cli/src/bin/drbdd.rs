//! `drbdd`: the daemon that will host resources and serve them as NBD exports. For now it only
//! reports its version.

fn main() {
    let mut args = std::env::args_os().skip(1);
    match args.next().as_ref().map(|a| a.to_string_lossy()).as_deref() {
        None | Some("--version") | Some("-V") => {
            println!("drbdd {}", env!("CARGO_PKG_VERSION"));
        }
        Some(other) => {
            eprintln!("drbdd: unknown argument '{other}'; only --version is supported so far");
            std::process::exit(1);
        }
    }
}
