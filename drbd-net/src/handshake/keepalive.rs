//! Keep-alive and liveness: ping-int, ping-timeout, timeout and ko-count.
//!
//! Time is a [`Duration`] since any fixed origin, passed in by the caller; the machine never
//! reads a clock. The caller calls [`KeepAlive::poll`] no later than
//! [`KeepAlive::next_deadline`].
//!
//! * The meta socket idles for ping-int. Then, unless something arrived on the data socket in
//!   the meantime (which proves the peer alive), we send P_PING and give the peer
//!   ping-timeout for the P_PING_ACK; without it the connection has failed.
//! * A P_PING from the peer is answered at once.
//! * A send on the data socket that makes no progress for `timeout` costs one ko-count and
//!   asks for a ping; when ko-count runs out the peer is declared dead. ko-count 0 disables
//!   this.

use std::time::Duration;

/// Timing settings, in DRBD's units converted to durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAliveConfig {
    pub ping_int: Duration,
    pub ping_timeout: Duration,
    pub timeout: Duration,
    pub ko_count: u32,
}

impl Default for KeepAliveConfig {
    /// DRBD's defaults: ping-int 10 s, ping-timeout 0.5 s, timeout 6 s, ko-count 7.
    fn default() -> Self {
        KeepAliveConfig {
            ping_int: Duration::from_secs(10),
            ping_timeout: Duration::from_millis(500),
            timeout: Duration::from_secs(6),
            ko_count: 7,
        }
    }
}

/// What the transport must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAliveAction {
    SendPing,
    SendPingAck,
    /// The peer is considered dead; the reason is for the log.
    Fail(&'static str),
}

/// Liveness state of one established connection.
#[derive(Debug)]
pub struct KeepAlive {
    cfg: KeepAliveConfig,
    /// When the meta socket last received anything.
    meta_seen: Duration,
    /// When the data socket last received anything.
    data_seen: Duration,
    /// Set while a P_PING is outstanding: when it was sent.
    ping_sent: Option<Duration>,
    /// Set while a data-socket send is stuck: since when (or since the last ko tick).
    send_blocked: Option<Duration>,
    ko_left: u32,
    pings_sent: u64,
    acks_received: u64,
    failed: bool,
}

impl KeepAliveConfig {
    /// Checks what the timing logic relies on: positive intervals.
    pub fn validate(&self) -> Result<(), String> {
        if self.ping_int.is_zero() || self.ping_timeout.is_zero() || self.timeout.is_zero() {
            return Err(format!(
                "ping-int, ping-timeout and timeout must be positive: {self:?}"
            ));
        }
        Ok(())
    }
}

impl KeepAlive {
    /// `cfg` must pass [`KeepAliveConfig::validate`].
    pub fn new(cfg: KeepAliveConfig, now: Duration) -> Self {
        // Zero intervals would make every deadline expire at once: callers validate first.
        assert!(cfg.validate().is_ok(), "keep-alive settings not validated");
        KeepAlive {
            cfg,
            meta_seen: now,
            data_seen: now,
            ping_sent: None,
            send_blocked: None,
            ko_left: cfg.ko_count,
            pings_sent: 0,
            acks_received: 0,
            failed: false,
        }
    }

    /// A packet arrived on the meta socket.
    pub fn on_meta_packet(
        &mut self,
        now: Duration,
        ping: bool,
        ping_ack: bool,
    ) -> Option<KeepAliveAction> {
        self.meta_seen = now;
        if ping_ack {
            self.ping_sent = None;
            self.acks_received += 1;
        }
        ping.then_some(KeepAliveAction::SendPingAck)
    }

    /// Something arrived on the data socket.
    pub fn on_data_received(&mut self, now: Duration) {
        self.data_seen = now;
    }

    /// A data-socket send began waiting for buffer space (or made progress and is still
    /// waiting): restarts the `timeout` clock and refills ko-count.
    pub fn on_send_waiting(&mut self, now: Duration) {
        self.send_blocked = Some(now);
        self.ko_left = self.cfg.ko_count;
    }

    /// The data-socket send completed.
    pub fn on_send_done(&mut self) {
        self.send_blocked = None;
    }

    /// Pings sent and acknowledged so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.pings_sent, self.acks_received)
    }

    /// The latest time by which [`KeepAlive::poll`] must be called.
    pub fn next_deadline(&self) -> Duration {
        let mut d = match self.ping_sent {
            // Like a receive timeout: anything arriving on the meta socket restarts it.
            Some(sent) => sent.max(self.meta_seen) + self.cfg.ping_timeout,
            None => self.meta_seen.max(self.data_seen) + self.cfg.ping_int,
        };
        if let (Some(b), true) = (self.send_blocked, self.cfg.ko_count > 0) {
            d = d.min(b + self.cfg.timeout);
        }
        d
    }

    /// Checks the deadlines.
    pub fn poll(&mut self, now: Duration) -> Option<KeepAliveAction> {
        if self.failed {
            return None;
        }
        if let Some(blocked) = self.send_blocked {
            if self.cfg.ko_count > 0 && now >= blocked + self.cfg.timeout {
                self.ko_left = self.ko_left.saturating_sub(1);
                if self.ko_left == 0 {
                    self.failed = true;
                    return Some(KeepAliveAction::Fail(
                        "peer did not take data for ko-count * timeout",
                    ));
                }
                self.send_blocked = Some(now);
                if self.ping_sent.is_none() {
                    return Some(self.ping(now));
                }
            }
        }
        match self.ping_sent {
            Some(sent) => {
                // The meta socket must not stay silent for ping-timeout while a ping is
                // outstanding; other packets restart the wait but do not replace the ack.
                if now >= sent.max(self.meta_seen) + self.cfg.ping_timeout {
                    self.failed = true;
                    return Some(KeepAliveAction::Fail("PingAck did not arrive in time"));
                }
                None
            }
            None => {
                let idle_since = self.meta_seen.max(self.data_seen);
                (now >= idle_since + self.cfg.ping_int).then(|| self.ping(now))
            }
        }
    }

    fn ping(&mut self, now: Duration) -> KeepAliveAction {
        self.ping_sent = Some(now);
        self.pings_sent += 1;
        KeepAliveAction::SendPing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KeepAliveConfig {
        KeepAliveConfig {
            ping_int: Duration::from_secs(10),
            ping_timeout: Duration::from_millis(500),
            timeout: Duration::from_secs(6),
            ko_count: 3,
        }
    }
    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    #[test]
    fn idle_connection_pings_every_ping_int() {
        let mut k = KeepAlive::new(cfg(), s(0.0));
        assert_eq!(k.poll(s(9.9)), None);
        assert_eq!(k.next_deadline(), s(10.0));
        assert_eq!(k.poll(s(10.0)), Some(KeepAliveAction::SendPing));
        assert_eq!(k.on_meta_packet(s(10.1), false, true), None);
        assert_eq!(k.poll(s(19.9)), None);
        assert_eq!(k.poll(s(20.1)), Some(KeepAliveAction::SendPing));
        assert_eq!(k.counters(), (2, 1));
    }

    #[test]
    fn missing_ping_ack_fails_after_ping_timeout() {
        let mut k = KeepAlive::new(cfg(), s(0.0));
        assert_eq!(k.poll(s(10.0)), Some(KeepAliveAction::SendPing));
        assert_eq!(k.next_deadline(), s(10.5));
        assert_eq!(k.poll(s(10.4)), None);
        assert_eq!(
            k.poll(s(10.5)),
            Some(KeepAliveAction::Fail("PingAck did not arrive in time"))
        );
        assert_eq!(k.poll(s(11.0)), None, "fails once");
    }

    #[test]
    fn data_traffic_postpones_pings_and_pings_are_answered() {
        let mut k = KeepAlive::new(cfg(), s(0.0));
        k.on_data_received(s(8.0));
        assert_eq!(k.poll(s(10.0)), None);
        assert_eq!(k.poll(s(18.0)), Some(KeepAliveAction::SendPing));
        assert_eq!(
            k.on_meta_packet(s(18.1), true, false),
            Some(KeepAliveAction::SendPingAck)
        );
    }

    #[test]
    fn other_meta_traffic_postpones_but_does_not_replace_the_ack() {
        let mut k = KeepAlive::new(cfg(), s(0.0));
        assert_eq!(k.poll(s(10.0)), Some(KeepAliveAction::SendPing));
        // The peer pings us instead of answering: that restarts the wait...
        assert_eq!(
            k.on_meta_packet(s(10.3), true, false),
            Some(KeepAliveAction::SendPingAck)
        );
        assert_eq!(k.next_deadline(), s(10.8));
        assert_eq!(k.poll(s(10.6)), None);
        // ...but silence afterwards still fails the connection, and the deadline never
        // lies in the past while waiting (no busy loop).
        assert_eq!(
            k.poll(s(10.8)),
            Some(KeepAliveAction::Fail("PingAck did not arrive in time"))
        );
    }

    #[test]
    fn deadlines_are_always_ahead_after_poll() {
        let mut k = KeepAlive::new(
            KeepAliveConfig {
                ko_count: 0,
                ..cfg()
            },
            s(0.0),
        );
        k.on_send_waiting(s(0.0));
        let mut now = s(0.0);
        for step in 0..200 {
            now += s(0.05);
            if step % 7 == 0 {
                k.on_meta_packet(now, false, step % 14 == 0);
            }
            if let Some(KeepAliveAction::Fail(_)) = k.poll(now) {
                break;
            }
            assert!(
                k.next_deadline() > now,
                "deadline {:?} not after {now:?}",
                k.next_deadline()
            );
        }
    }

    #[test]
    fn zero_intervals_are_refused() {
        assert!(KeepAliveConfig {
            ping_int: Duration::ZERO,
            ..cfg()
        }
        .validate()
        .is_err());
        assert!(cfg().validate().is_ok());
    }

    #[test]
    fn stuck_sends_use_up_ko_count() {
        let mut k = KeepAlive::new(cfg(), s(0.0));
        k.on_send_waiting(s(1.0));
        assert_eq!(k.poll(s(7.0)), Some(KeepAliveAction::SendPing));
        k.on_meta_packet(s(7.1), false, true);
        assert_eq!(k.poll(s(13.0)), Some(KeepAliveAction::SendPing));
        k.on_meta_packet(s(13.1), false, true);
        assert_eq!(
            k.poll(s(19.0)),
            Some(KeepAliveAction::Fail(
                "peer did not take data for ko-count * timeout"
            ))
        );
    }

    #[test]
    fn progress_refills_ko_count() {
        let mut k = KeepAlive::new(cfg(), s(0.0));
        k.on_send_waiting(s(0.0));
        assert_eq!(k.poll(s(6.0)), Some(KeepAliveAction::SendPing));
        k.on_meta_packet(s(6.1), false, true);
        k.on_send_waiting(s(7.0));
        assert_eq!(k.poll(s(13.0)), Some(KeepAliveAction::SendPing));
        k.on_meta_packet(s(13.1), false, true);
        k.on_send_done();
        assert_eq!(k.poll(s(19.0)), None);
    }
}
