//! The control protocol between `drbdadm` and `drbdd`: newline-delimited JSON over the Unix
//! socket `STATE_DIR/drbdd.sock`.
//!
//! A client writes one [`Request`] per line and reads one [`Response`] per line, as many times
//! as it likes on one connection. The daemon plays the part `drbdsetup` and the kernel play for
//! drbd-utils: a response carries what `drbdsetup` would have printed and its exit code;
//! `drbdadm` adds its own `Command '...' terminated with exit code N` line.
//!
//! ```text
//! > {"command":"primary","resource":"r0","volume":null,"options":{"force":false},"node":"alpha"}
//! < {"exit_code":17,"stdout":"","stderr":"0: State change failed: (-2) Need access to UpToDate data\n"}
//! ```
//!
//! Lines are bounded ([`MAX_REQUEST_LINE`], [`MAX_RESPONSE_LINE`]); a request that is too long,
//! not JSON or not a known command gets an error response, never a crash.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// File name of the control socket inside the state directory.
pub const SOCKET_NAME: &str = "drbdd.sock";
/// Longest request line the daemon reads (without the newline).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Longest response line a client reads (without the newline).
pub const MAX_RESPONSE_LINE: usize = 1024 * 1024;
/// How long the daemon keeps a connection on which no request arrives.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Exit code of a request the daemon could not understand (`drbdsetup`'s "other errors").
pub const E_PROTOCOL: i32 = 20;

/// The control socket of a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// A command the daemon carries out. `wait-connect` is not one: `drbdadm` polls `cstate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    Up,
    Down,
    Attach,
    Detach,
    Connect,
    Disconnect,
    Primary,
    Secondary,
    Invalidate,
    InvalidateRemote,
    NewCurrentUuid,
    Verify,
    Outdate,
    PauseSync,
    ResumeSync,
    SuspendIo,
    ResumeIo,
    Role,
    Cstate,
    Dstate,
    Status,
}

impl Command {
    /// Every command, in the order of `drbdadm help`.
    pub const ALL: [Command; 21] = [
        Command::Up,
        Command::Down,
        Command::Attach,
        Command::Detach,
        Command::Connect,
        Command::Disconnect,
        Command::Primary,
        Command::Secondary,
        Command::Invalidate,
        Command::InvalidateRemote,
        Command::NewCurrentUuid,
        Command::Verify,
        Command::Outdate,
        Command::PauseSync,
        Command::ResumeSync,
        Command::SuspendIo,
        Command::ResumeIo,
        Command::Role,
        Command::Cstate,
        Command::Dstate,
        Command::Status,
    ];

    /// The command's name on the command line (and on the wire).
    pub fn name(self) -> &'static str {
        match self {
            Command::Up => "up",
            Command::Down => "down",
            Command::Attach => "attach",
            Command::Detach => "detach",
            Command::Connect => "connect",
            Command::Disconnect => "disconnect",
            Command::Primary => "primary",
            Command::Secondary => "secondary",
            Command::Invalidate => "invalidate",
            Command::InvalidateRemote => "invalidate-remote",
            Command::NewCurrentUuid => "new-current-uuid",
            Command::Verify => "verify",
            Command::Outdate => "outdate",
            Command::PauseSync => "pause-sync",
            Command::ResumeSync => "resume-sync",
            Command::SuspendIo => "suspend-io",
            Command::ResumeIo => "resume-io",
            Command::Role => "role",
            Command::Cstate => "cstate",
            Command::Dstate => "dstate",
            Command::Status => "status",
        }
    }

    /// The command of a command-line name.
    pub fn from_name(name: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Commands that act on a whole resource: `RES/VNR` is a usage error for them.
    pub fn whole_resource(self) -> bool {
        matches!(
            self,
            Command::Down | Command::Connect | Command::Disconnect | Command::Status
        )
    }

    /// Commands that only read state.
    pub fn is_query(self) -> bool {
        matches!(
            self,
            Command::Role | Command::Cstate | Command::Dstate | Command::Status
        )
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Command options. Unknown option names are refused, so that a typo is not silently ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// `primary --force`.
    pub force: bool,
    /// `connect --discard-my-data`.
    pub discard_my_data: bool,
    /// `new-current-uuid --clear-bitmap`.
    pub clear_bitmap: bool,
    /// `status --verbose`.
    pub verbose: bool,
    /// `status --statistics`.
    pub statistics: bool,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub command: Command,
    /// The resource name as the configuration spells it.
    #[serde(default)]
    pub resource: Option<String>,
    /// `RES/VNR`: only this volume.
    #[serde(default)]
    pub volume: Option<u32>,
    #[serde(default)]
    pub options: Options,
    /// The node name `drbdadm` resolved the configuration for; the daemon refuses requests
    /// meant for another node, since the two would read different host sections.
    #[serde(default)]
    pub node: Option<String>,
}

impl Request {
    /// A request on one resource with default options.
    pub fn new(command: Command, resource: &str) -> Request {
        Request {
            command,
            resource: Some(resource.to_string()),
            volume: None,
            options: Options::default(),
            node: None,
        }
    }
}

/// One response: what to print and the exit code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub exit_code: i32,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
}

impl Response {
    /// Success with `stdout`.
    pub fn ok(stdout: impl Into<String>) -> Response {
        Response {
            exit_code: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// Failure with `exit_code` and a message for stderr (a newline is added if missing).
    pub fn error(exit_code: i32, stderr: impl Into<String>) -> Response {
        let mut stderr = stderr.into();
        if !stderr.is_empty() && !stderr.ends_with('\n') {
            stderr.push('\n');
        }
        Response {
            exit_code,
            stdout: String::new(),
            stderr,
        }
    }
}

/// What reading one line gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// A line (without its newline) is in the buffer.
    Complete,
    /// The peer closed the connection before sending anything more.
    Eof,
    /// More than the limit without a newline; the framing is lost.
    TooLong,
}

/// Reads one line of at most `limit` bytes (plus the newline) into `buf`. A last line without a
/// newline before the end of the stream counts as a line.
pub(crate) async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let limit_plus_newline = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let n = (&mut *reader)
        .take(limit_plus_newline)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Complete);
    }
    if buf.len() > limit {
        return Ok(Line::TooLong);
    }
    Ok(Line::Complete)
}

/// Decodes one request line. The error is the response to send.
pub fn parse_request(line: &[u8]) -> Result<Request, Response> {
    let text = std::str::from_utf8(line).map_err(|e| {
        Response::error(
            E_PROTOCOL,
            format!("drbdd: malformed request: not UTF-8 ({e})"),
        )
    })?;
    serde_json::from_str(text.trim_end_matches('\r'))
        .map_err(|e| Response::error(E_PROTOCOL, format!("drbdd: malformed request: {e}")))
}

/// Encodes a value as one line (with its newline).
fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail; fall back to a fixed error line anyway.
    let mut out = serde_json::to_vec(value).unwrap_or_else(|_| {
        br#"{"exit_code":20,"stdout":"","stderr":"drbdd: cannot encode the response\n"}"#.to_vec()
    });
    out.push(b'\n');
    out
}

/// Serves one client connection: reads requests until the client closes the connection (or
/// sends nothing for [`IDLE_TIMEOUT`], or breaks the framing) and answers each with `handle`.
pub(crate) async fn serve_connection<S, F, Fut>(stream: S, handle: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: Fn(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = tokio::io::BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        let line = match tokio::time::timeout(
            IDLE_TIMEOUT,
            read_line_bounded(&mut reader, &mut buf, MAX_REQUEST_LINE),
        )
        .await
        {
            Err(_) => {
                tracing::debug!("control client idle for {IDLE_TIMEOUT:?}; closing");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!("control client read error: {e}");
                return;
            }
            Ok(Ok(l)) => l,
        };
        let (response, close) = match line {
            Line::Eof => return,
            Line::TooLong => (
                Response::error(
                    E_PROTOCOL,
                    format!("drbdd: request longer than {MAX_REQUEST_LINE} bytes; closing the connection"),
                ),
                true,
            ),
            Line::Complete if buf.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Complete => match parse_request(&buf) {
                Ok(req) => (handle(req).await, false),
                Err(resp) => (resp, false),
            },
        };
        if let Err(e) = write.write_all(&encode_line(&response)).await {
            tracing::debug!("control client write error: {e}");
            return;
        }
        if close {
            return;
        }
    }
}

/// Why talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("drbdd is not running (no control socket at {})", .0.display())]
    NotRunning(PathBuf),
    #[error("cannot connect to drbdd at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lost the connection to drbdd at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drbdd at {} closed the connection without answering", .0.display())]
    Closed(PathBuf),
    #[error("drbdd at {} sent a malformed response: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
}

/// A blocking client connection (drbdadm needs no runtime).
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the control socket at `path`. A missing socket or one nobody listens on
    /// (left behind by a daemon that was killed) is [`ClientError::NotRunning`].
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(path.to_path_buf())
            }
            _ => ClientError::Connect {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let writer = stream.try_clone().map_err(|e| ClientError::Connect {
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request and waits for its response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let io_err = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer.write_all(&encode_line(req)).map_err(io_err)?;
        let mut buf = Vec::new();
        let limit = u64::try_from(MAX_RESPONSE_LINE).unwrap_or(u64::MAX) + 1;
        let n = std::io::Read::take(&mut self.reader, limit)
            .read_until(b'\n', &mut buf)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Closed(self.path.clone()));
        }
        if buf.last() != Some(&b'\n') {
            let reason = if buf.len() > MAX_RESPONSE_LINE {
                format!("longer than {MAX_RESPONSE_LINE} bytes")
            } else {
                "cut off".to_string()
            };
            return Err(ClientError::Malformed {
                path: self.path.clone(),
                reason,
            });
        }
        serde_json::from_slice(&buf).map_err(|e| ClientError::Malformed {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut req = Request::new(Command::NewCurrentUuid, "r0");
        req.volume = Some(1);
        req.options.clear_bitmap = true;
        req.node = Some("alpha".into());
        let line = encode_line(&req);
        assert!(line.ends_with(b"\n"));
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(text.contains(r#""command":"new-current-uuid""#), "{text}");
        assert!(text.contains(r#""clear-bitmap":true"#), "{text}");
        assert_eq!(parse_request(&line[..line.len() - 1]).unwrap(), req);
    }

    #[test]
    fn minimal_request_and_defaults() {
        let req = parse_request(br#"{"command":"status"}"#).unwrap();
        assert_eq!(req.command, Command::Status);
        assert_eq!(req.resource, None);
        assert_eq!(req.options, Options::default());
    }

    #[test]
    fn malformed_requests_are_errors() {
        for bad in [
            &b"not json"[..],
            br#"{"command":"frobnicate","resource":"r0"}"#,
            br#"{"command":"up","resource":"r0","options":{"forse":true}}"#,
            br#"{"command":"up","bogus":1}"#,
            br#"{"command":"up","volume":-1}"#,
            b"\xff\xfe",
            br#"[1,2,3]"#,
        ] {
            let err = parse_request(bad).unwrap_err();
            assert_eq!(err.exit_code, E_PROTOCOL);
            assert!(
                err.stderr.starts_with("drbdd: malformed request"),
                "{}",
                err.stderr
            );
        }
    }

    #[test]
    fn command_names() {
        for c in Command::ALL {
            assert_eq!(Command::from_name(c.name()), Some(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.name()));
        }
        assert_eq!(Command::from_name("wait-connect"), None);
    }

    #[tokio::test]
    async fn bounded_lines() {
        let data = b"short\nexactly8\n0123456789abc".to_vec();
        let mut r = tokio::io::BufReader::new(&data[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 8).await.unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"short");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 8).await.unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"exactly8");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 8).await.unwrap(),
            Line::TooLong
        );
        let mut r = tokio::io::BufReader::new(&b"tail"[..]);
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 8).await.unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"tail");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 8).await.unwrap(),
            Line::Eof
        );
    }
}
