//! Running the drbd.conf `handlers { }` commands: `/bin/sh -c COMMAND` with DRBD's
//! environment. They run one after the other, in the order DRBD's moments came (as 8.4's
//! helpers do), on a thread of the resource's own, so that a hanging or failing handler
//! never holds up replication or state queries. A handler that runs longer than
//! [`HANDLER_TIMEOUT`] is killed; every outcome is logged.

use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a handler may run.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(60);
/// Most handlers waiting for their turn per resource; more are skipped (and logged).
pub const MAX_QUEUED: usize = 16;

/// Receives a handler's exit code (-1 when it could not run, was killed, or none is
/// configured).
pub type Done = Box<dyn FnOnce(i32) + Send>;

/// One handler waiting for its turn: resource, handler name, the command, who wants the
/// exit code.
type Job = (String, &'static str, Command, Option<Done>);

/// The configured handler commands of a resource and the environment they run with.
#[derive(Debug, Clone, Default)]
pub struct Handlers {
    /// (handler name, shell command).
    pub commands: Vec<(String, String)>,
    /// `DRBD_RESOURCE`, `DRBD_MINOR`, `DRBD_PEER_ADDRESS`, ... (8.4 drbdadm's set).
    pub env: Vec<(String, String)>,
    /// The queue of the resource's handler thread, started with the first handler.
    queue: Arc<Mutex<Option<SyncSender<Job>>>>,
}

impl Handlers {
    pub fn new(commands: Vec<(String, String)>, env: Vec<(String, String)>) -> Handlers {
        Handlers {
            commands,
            env,
            queue: Arc::new(Mutex::new(None)),
        }
    }

    /// The command configured for handler `name`.
    pub fn command(&self, name: &str) -> Option<&str> {
        self.commands
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.as_str())
    }

    /// Starts handler `name` if one is configured; returns at once. `done` gets the exit
    /// code.
    pub fn run(&self, resource: &str, name: &'static str, done: Option<Done>) {
        let Some(cmd) = self.command(name) else {
            tracing::debug!(resource, handler = name, "no handler configured");
            if let Some(done) = done {
                done(-1);
            }
            return;
        };
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg(cmd)
            .env_clear()
            .env("HOME", "/")
            .env("TERM", "linux")
            .env("PATH", "/sbin:/usr/sbin:/bin:/usr/bin")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        tracing::info!(resource, handler = name, "helper command: {cmd}");
        let mut queue = self.queue.lock().expect("handler queue");
        let tx = queue.get_or_insert_with(|| {
            let (tx, rx) = sync_channel::<Job>(MAX_QUEUED);
            std::thread::spawn(move || {
                for (resource, name, c, done) in rx {
                    let code = watch(&resource, name, c);
                    if let Some(done) = done {
                        done(code);
                    }
                }
            });
            tx
        });
        let refused = match tx.try_send((resource.to_string(), name, c, done)) {
            Ok(()) => return,
            Err(TrySendError::Full(job)) => {
                tracing::warn!(
                    resource,
                    handler = name,
                    "{MAX_QUEUED} handlers wait for their turn already; not running this one"
                );
                job
            }
            Err(TrySendError::Disconnected(job)) => {
                tracing::warn!(resource, handler = name, "the handler thread is gone");
                job
            }
        };
        if let Some(done) = refused.3 {
            done(-1);
        }
    }
}

/// Runs `c` to its end or to the timeout; its exit code, or -1.
fn watch(resource: &str, name: &str, mut c: Command) -> i32 {
    let mut child = match c.spawn() {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(resource, handler = name, "handler could not start: {e}");
            return -1;
        }
    };
    let deadline = Instant::now() + HANDLER_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let code = status.code().unwrap_or(-1);
                if code == 0 {
                    tracing::info!(
                        resource,
                        handler = name,
                        "helper command: {name} exit code 0"
                    );
                } else {
                    tracing::warn!(
                        resource,
                        handler = name,
                        "helper command: {name} exit code {code}"
                    );
                }
                return code;
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(
                    resource,
                    handler = name,
                    "handler ran longer than {} s: killed",
                    HANDLER_TIMEOUT.as_secs()
                );
                return -1;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!(
                    resource,
                    handler = name,
                    "waiting for the handler failed: {e}"
                );
                return -1;
            }
        }
    }
}
