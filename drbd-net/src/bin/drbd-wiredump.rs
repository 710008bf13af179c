//! `drbd-wiredump`: prints every DRBD packet of a packet capture, one line each, in capture
//! order, decoded with this project's DRBD 8.4 wire codec.
//!
//! Exit status: 0 when every DRBD packet decoded; 1 when a DRBD stream could not be decoded
//! (the message names the stream, direction, byte offset and reason), when the file cannot
//! be read or is not a pcap file, or (with `--strict`) when the capture misses bytes of a
//! DRBD stream; 2 for bad arguments.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use drbd_net::capture::{analyze_file, summary, AnalyzeOptions, Notice};

const USAGE: &str = "\
usage: drbd-wiredump [OPTIONS] FILE.pcap[.gz]

Prints one line per DRBD packet found in a libpcap capture (plain or gzip-compressed;
Ethernet, Linux cooked, raw IP or loopback link types), in capture order:

  #FRAME sSTREAM SRC:PORT>DST:PORT P_NAME cmd=0xCODE len=PAYLOAD_LEN hdr=h100 vol=N FIELDS...

TCP streams are reassembled by sequence number; a direction is DRBD when its first bytes
are a DRBD header magic. The handshake (P_CONNECTION_FEATURES, P_PROTOCOL) sets how later
packets are decoded; streams whose handshake is not captured are decoded as protocol 101
with feature flags 0xf and no data-integrity digest.

options:
  --counts     after the packets, print the number of packets per command
  --strict     exit 1 also when bytes of a DRBD stream are missing from the capture (a gap,
               a packet cut off at the end, or a file cut short)
  -h, --help   print this help

exit status: 0 all DRBD packets decoded; 1 a DRBD stream could not be decoded, or the file
is unreadable or not a pcap file; 2 bad arguments.
";

struct Args {
    path: PathBuf,
    counts: bool,
    strict: bool,
}

enum Parsed {
    Run(Args),
    Help,
}

fn parse_args() -> Result<Parsed, String> {
    let mut path = None;
    let mut counts = false;
    let mut strict = false;
    let mut only_paths = false;
    for arg in std::env::args_os().skip(1) {
        let text = arg.to_string_lossy();
        if !only_paths && text.starts_with('-') && text.len() > 1 {
            match text.as_ref() {
                "-h" | "--help" => return Ok(Parsed::Help),
                "--counts" => counts = true,
                "--strict" => strict = true,
                "--" => only_paths = true,
                other => return Err(format!("unknown option {other}")),
            }
        } else if path.is_none() {
            path = Some(PathBuf::from(arg));
        } else {
            return Err("only one capture file may be given".to_string());
        }
    }
    match path {
        Some(path) => Ok(Parsed::Run(Args {
            path,
            counts,
            strict,
        })),
        None => Err("no capture file given".to_string()),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("drbd-wiredump: {msg}");
            eprintln!("usage: drbd-wiredump [--counts] [--strict] FILE.pcap[.gz] (see --help)");
            return ExitCode::from(2);
        }
    };
    let name = args.path.display().to_string();
    let analysis = match analyze_file(&args.path, AnalyzeOptions::default()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("drbd-wiredump: {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut write_ok = true;
    for r in &analysis.records {
        if writeln!(out, "{}", summary::format_record(r)).is_err() {
            write_ok = false;
            break;
        }
    }
    if write_ok && args.counts {
        let counts: BTreeMap<_, _> = analysis.command_counts();
        for (name, n) in counts {
            if writeln!(out, "count {name} {n}").is_err() {
                write_ok = false;
                break;
            }
        }
    }
    if out.flush().is_err() {
        write_ok = false;
    }
    drop(out);
    let mut status = ExitCode::SUCCESS;
    let mut missing_bytes = false;
    for n in &analysis.notices {
        eprintln!("drbd-wiredump: {name}: warning: {n}");
        if matches!(
            n,
            Notice::Stream { .. } | Notice::Truncated { .. } | Notice::Capture(_)
        ) {
            missing_bytes = true;
        }
    }
    if analysis.records.is_empty() && analysis.failures.is_empty() {
        eprintln!(
            "drbd-wiredump: {name}: no DRBD traffic found ({} frames, {} TCP streams)",
            analysis.frames,
            analysis.streams.len()
        );
    }
    for f in &analysis.failures {
        eprintln!("drbd-wiredump: {name}: cannot decode {f}");
        status = ExitCode::FAILURE;
    }
    if args.strict && missing_bytes {
        status = ExitCode::FAILURE;
    }
    // A closed stdout (piped into `head`) is not an error of the capture: `write_ok` only
    // stops the printing early.
    let _ = write_ok;
    status
}
