//! A disk engine that fails chosen operations: for tests of `on-io-error` against a real
//! daemon. It wraps another engine, lets every operation run there, and reports EIO for the
//! ones its [`FaultPlan`] selects (the data may or may not have reached the file, as with a
//! failing disk).

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};

use super::{CompletionReceiver, DiskEngine, DiskOp, DiskOpKind, SubmitError};

/// Which operations fail: every write (reads) after the first `writes_after`
/// (`reads_after`) ones succeeded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub writes_after: Option<u64>,
    pub reads_after: Option<u64>,
}

impl FaultPlan {
    /// Parses `writes-after=N`, `reads-after=N`, or both separated by a comma.
    pub fn parse(spec: &str) -> Result<FaultPlan, String> {
        let mut plan = FaultPlan::default();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("fault plan '{spec}': '{part}' is not KEY=N"))?;
            let n: u64 = value
                .parse()
                .map_err(|_| format!("fault plan '{spec}': '{value}' is not a number"))?;
            match key {
                "writes-after" => plan.writes_after = Some(n),
                "reads-after" => plan.reads_after = Some(n),
                other => {
                    return Err(format!(
                        "fault plan '{spec}': unknown key '{other}' (writes-after, reads-after)"
                    ))
                }
            }
        }
        Ok(plan)
    }
}

struct Faulty {
    inner: Box<dyn DiskEngine>,
    plan: FaultPlan,
    /// Writes and reads submitted so far.
    counts: Mutex<(u64, u64)>,
    /// Ids of submitted operations whose completion reports EIO.
    failing: Arc<Mutex<HashSet<u64>>>,
}

impl DiskEngine for Faulty {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn direct_io(&self) -> bool {
        self.inner.direct_io()
    }

    fn queue_depth(&self) -> u32 {
        self.inner.queue_depth()
    }

    fn file_len(&self) -> io::Result<u64> {
        self.inner.file_len()
    }

    fn submit(&self, op: DiskOp) -> Result<(), SubmitError> {
        let fail = {
            let mut c = self.counts.lock().expect("counts");
            match op.kind {
                DiskOpKind::Write { .. } | DiskOpKind::WriteZeroes | DiskOpKind::Discard => {
                    c.0 += 1;
                    self.plan.writes_after.is_some_and(|n| c.0 > n)
                }
                DiskOpKind::Read => {
                    c.1 += 1;
                    self.plan.reads_after.is_some_and(|n| c.1 > n)
                }
                DiskOpKind::Flush => false,
            }
        };
        let id = op.id;
        if fail {
            self.failing.lock().expect("failing").insert(id);
        }
        self.inner.submit(op).inspect_err(|_| {
            self.failing.lock().expect("failing").remove(&id);
        })
    }
}

/// Wraps `engine` (and its completion receiver) so that the operations `plan` selects
/// complete with EIO. Call within a tokio runtime: a task forwards the completions.
pub fn inject_faults(
    engine: Box<dyn DiskEngine>,
    mut completions: CompletionReceiver,
    plan: FaultPlan,
) -> (Box<dyn DiskEngine>, CompletionReceiver) {
    let failing = Arc::new(Mutex::new(HashSet::new()));
    // The forwarder keeps up with the inner engine: at most queue_depth completions exist.
    let (tx, rx) = tokio::sync::mpsc::channel(engine.queue_depth().max(1) as usize);
    let f = Arc::clone(&failing);
    tokio::spawn(async move {
        while let Some(mut c) = completions.recv().await {
            if f.lock().expect("failing").remove(&c.id) {
                c.result = Err(io::Error::from_raw_os_error(
                    rustix::io::Errno::IO.raw_os_error(),
                ));
            }
            if tx.send(c).await.is_err() {
                break;
            }
        }
    });
    let faulty = Faulty {
        inner: engine,
        plan,
        counts: Mutex::new((0, 0)),
        failing,
    };
    (Box::new(faulty), rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_bad_ones_are_refused() {
        assert_eq!(
            FaultPlan::parse("writes-after=10,reads-after=3"),
            Ok(FaultPlan {
                writes_after: Some(10),
                reads_after: Some(3)
            })
        );
        assert!(FaultPlan::parse("writes-after").is_err());
        assert!(FaultPlan::parse("writes-after=x").is_err());
        assert!(FaultPlan::parse("flushes-after=1").is_err());
    }
}
