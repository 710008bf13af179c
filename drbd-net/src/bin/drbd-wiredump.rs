//! `drbd-wiredump`: prints every DRBD packet of a packet capture, one line each, in capture
//! order, decoded with this project's DRBD 8.4 wire codec.
//!
//! Exit status: 0 when every DRBD packet decoded; 1 when a DRBD stream could not be decoded
//! (the message names the stream, direction, byte offset and reason), when the file cannot
//! be read or is not a pcap file, when the output cannot be written, or (with `--strict`)
//! when the capture misses bytes of a DRBD stream; 2 for bad arguments. When the reader of
//! the output goes away (a broken pipe, as in `drbd-wiredump x.pcap | head`), the program
//! stops quietly with status 0.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use drbd_net::capture::{pcap, summary, AnalyzeOptions, Notice, RecordStream};

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
               a packet cut off at the end, a file cut short, or more TCP connections than
               are tracked)
  -h, --help   print this help

exit status: 0 all DRBD packets decoded (or the output pipe was closed); 1 a DRBD stream
could not be decoded, the file is unreadable or not a pcap file, or the output cannot be
written; 2 bad arguments.
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

/// Writes one line to stderr. When stderr itself cannot be written there is nowhere left to
/// report that, so the error is dropped (where `eprintln!` would panic).
fn stderr_line(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

/// A diagnostic on stderr, prefixed with the program name.
fn warn(msg: std::fmt::Arguments<'_>) {
    stderr_line(format_args!("drbd-wiredump: {msg}"));
}

fn main() -> ExitCode {
    match run() {
        Ok(status) => status,
        // The reader went away (`drbd-wiredump x.pcap | head`): stop quietly, as other
        // filters do; what it did read was correct.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            warn(format_args!("cannot write the output: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Does the work; `Err` only for a failure to write to stdout.
fn run() -> io::Result<ExitCode> {
    let args = match parse_args() {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            let mut out = io::stdout().lock();
            out.write_all(USAGE.as_bytes())?;
            out.flush()?;
            return Ok(ExitCode::SUCCESS);
        }
        Err(msg) => {
            warn(format_args!("{msg}"));
            stderr_line(format_args!(
                "usage: drbd-wiredump [--counts] [--strict] FILE.pcap[.gz] (see --help)"
            ));
            return Ok(ExitCode::from(2));
        }
    };
    let name = args.path.display().to_string();
    let reader = match pcap::open(&args.path) {
        Ok(r) => r,
        Err(e) => {
            warn(format_args!("{name}: {e}"));
            return Ok(ExitCode::FAILURE);
        }
    };
    // Records are printed as they become final, not collected: memory stays bounded on
    // long captures.
    let mut records = RecordStream::new(reader, AnalyzeOptions::default());
    let mut out = BufWriter::new(io::stdout().lock());
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for r in &mut records {
        writeln!(out, "{}", summary::format_record(&r))?;
        *counts.entry(r.decoded.packet.command().name()).or_insert(0) += 1;
    }
    let analysis = records.finish();
    if args.counts {
        for (name, n) in &counts {
            writeln!(out, "count {name} {n}")?;
        }
    }
    out.flush()?;
    drop(out);
    let mut status = ExitCode::SUCCESS;
    let mut missing_bytes = false;
    for n in &analysis.notices {
        warn(format_args!("{name}: warning: {n}"));
        if matches!(
            n,
            Notice::Stream { .. }
                | Notice::Truncated { .. }
                | Notice::Capture(_)
                | Notice::StreamLimit { .. }
        ) {
            missing_bytes = true;
        }
    }
    if counts.is_empty() && analysis.failures.is_empty() {
        warn(format_args!(
            "{name}: no DRBD traffic found ({} frames, {} TCP streams)",
            analysis.frames,
            analysis.streams.len()
        ));
    }
    for f in &analysis.failures {
        warn(format_args!("{name}: cannot decode {f}"));
        status = ExitCode::FAILURE;
    }
    if args.strict && missing_bytes {
        status = ExitCode::FAILURE;
    }
    Ok(status)
}
