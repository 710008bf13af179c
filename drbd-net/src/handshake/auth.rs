//! cram-hmac: the challenge-response authentication of the data socket.

use hmac::{Hmac, Mac};

/// The HMAC hash functions we support for `cram-hmac-alg` (the kernel crypto names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl HmacAlg {
    /// Parses a `cram-hmac-alg` value.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha1" => Some(HmacAlg::Sha1),
            "sha256" => Some(HmacAlg::Sha256),
            "sha512" => Some(HmacAlg::Sha512),
            _ => None,
        }
    }

    /// Length of the response digest.
    pub fn digest_len(self) -> usize {
        match self {
            HmacAlg::Sha1 => 20,
            HmacAlg::Sha256 => 32,
            HmacAlg::Sha512 => 64,
        }
    }
}

/// Longest shared secret DRBD accepts (SHARED_SECRET_MAX).
pub const SECRET_MAX: usize = 64;

/// The configured algorithm and shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub alg: HmacAlg,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("AuthConfig")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

macro_rules! with_mac {
    ($alg:expr, $key:expr, |$mac:ident| $body:expr) => {
        match $alg {
            HmacAlg::Sha1 => {
                let mut $mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice($key)
                    .expect("HMAC takes keys of any length");
                $body
            }
            HmacAlg::Sha256 => {
                let mut $mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice($key)
                    .expect("HMAC takes keys of any length");
                $body
            }
            HmacAlg::Sha512 => {
                let mut $mac = <Hmac<sha2::Sha512> as Mac>::new_from_slice($key)
                    .expect("HMAC takes keys of any length");
                $body
            }
        }
    };
}

impl AuthConfig {
    /// Checks the configured values: a known algorithm name and a secret DRBD accepts.
    pub fn new(alg: &str, secret: &str) -> Result<Self, String> {
        let alg = HmacAlg::from_name(alg).ok_or_else(|| {
            format!("cram-hmac-alg '{alg}' is not supported (sha1, sha256, sha512)")
        })?;
        if secret.len() > SECRET_MAX {
            return Err(format!(
                "shared-secret is longer than {SECRET_MAX} characters"
            ));
        }
        Ok(AuthConfig {
            alg,
            secret: secret.as_bytes().to_vec(),
        })
    }

    /// Our answer to the peer's challenge: HMAC(secret, challenge).
    pub fn respond(&self, challenge: &[u8]) -> Vec<u8> {
        with_mac!(self.alg, &self.secret, |mac| {
            mac.update(challenge);
            mac.finalize().into_bytes().to_vec()
        })
    }

    /// Checks the peer's answer to our challenge, in constant time.
    pub fn verify(&self, challenge: &[u8], response: &[u8]) -> bool {
        with_mac!(self.alg, &self.secret, |mac| {
            mac.update(challenge);
            mac.verify_slice(response).is_ok()
        })
    }
}
