//! The two outside programs the harness drives: `drbdadm` (in this process) and fio (its
//! JSON report).

use std::process::Command;

use drbd_cli::adm::Io;

/// `drbdadm ARGS` in this process; returns its stdout, or its exit code and stderr.
pub fn drbdadm<S: AsRef<str>>(args: &[S]) -> Result<String, String> {
    let argv: Vec<String> = args.iter().map(|s| s.as_ref().to_string()).collect();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut stdin = std::io::empty();
    let mut io = Io {
        stdout: &mut out,
        stderr: &mut err,
        stdin: &mut stdin,
        interactive: false,
    };
    match drbd_cli::adm::run(&argv, &mut io) {
        0 => Ok(String::from_utf8_lossy(&out).into_owned()),
        code => Err(format!(
            "drbdadm {argv:?} exited {code}: {}",
            String::from_utf8_lossy(&err)
        )),
    }
}

/// Runs fio with `args` (plus `--output-format=json`) and returns the write side of its
/// first job (`jobs[0].write`).
pub fn fio_write_report(args: &[String]) -> Result<serde_json::Value, String> {
    let out = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let json = &text[text.find('{').ok_or("fio printed no JSON")?..];
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    Ok(v["jobs"][0]["write"].clone())
}
